# Sourced by the lab scripts (rounds.sh, chaos.sh, callcpu.sh): what more than one of them needs.

# busy_ticks: the CPU time the machine's processes have spent so far, all cores (user nice system irq
# softirq; not steal, the hypervisor's), in clock ticks (getconf CLK_TCK a second).
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }

# executable_of <plugin config>: its executablepath.
executable_of() { awk '/^executablepath:/ { print $2 }' "$1"; }

# floor_in <work dir>: put the floor plugin (floor_plugin.sh, beside this file) and its config there;
# the config's path is $1/floor.yaml.
floor_in() {
    mkdir -p "$1"
    install -m 755 "$(dirname "${BASH_SOURCE[0]}")/floor_plugin.sh" "$1/floor_plugin.sh"
    printf 'executablepath: %s\noptions:\n  note: the floor plugin takes no options\n' "$1/floor_plugin.sh" > "$1/floor.yaml"
}

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
