# Sourced by the lab scripts (rounds.sh, chaos.sh).
# fingerprint <database>: every user table's name, row count and md5 of its rows, one line each.
fingerprint() {
    local tables sql="" t
    tables=$(psql -At -d "$1" -c "select quote_ident(schemaname) || '.' || quote_ident(tablename) from pg_tables
                                  where schemaname not in ('pg_catalog', 'information_schema', 'gp_toolkit')
                                  order by 1")
    for t in $tables; do
        sql+="${sql:+ union all }select '$t', count(*), md5(coalesce(string_agg(r::text, ',' order by r::text), '')) from $t r"
    done
    [ -n "$sql" ] && psql -At -d "$1" -c "$sql order by 1"
}
