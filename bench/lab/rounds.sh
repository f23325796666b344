#!/bin/bash
# Per-table gpbackup and gprestore of one database on a real cluster (../shared/greenplum-lab), three
# ways per round: to a local --backup-dir, through the floor plugin (floor_plugin.sh: cat to local disk,
# what any plugin costs), and through ours. Prints each time and its ratio to the local one, and at the
# end the median of each ratio over the rounds, and of the CPU time the whole machine spent on each
# gpbackup (on the lab the backup host, sshd and sftp-server, shares the cluster's cores); every restored
# database is compared with the source, table by table (rows and md5), or the round fails.
#
#   . /opt/gplab/env.sh   # as the cluster user
#   bash bench/lab/rounds.sh <our plugin config.yaml> <database> [rounds, default 3]
#
# The floor plugin and its config are written to $WORK (default: a directory beside our config);
# the floor's and the local backups are removed after each round, ours with delete_backup.
set -euo pipefail
CFG=$(readlink -f "${1:?usage: rounds.sh <plugin config> <database> [rounds]}")
DB=${2:?usage: rounds.sh <plugin config> <database> [rounds]}
ROUNDS=${3:-3}
WORK=${WORK:-$(dirname "$CFG")/lab-rounds}
. "$(dirname "${BASH_SOURCE[0]}")/lab.sh"
PLUGIN=$(executable_of "$CFG")
mkdir -p "$WORK/local"
floor_in "$WORK"
LOG=$WORK/last.log

TICKS=$(getconf CLK_TCK)
# seconds <command...>: run it, its output to $LOG; print its wall time and the CPU time the machine spent
# meanwhile, in seconds: "<wall> <cpu>" (wall_of and cpu_of take them apart).
seconds() {
    local start end busy
    busy=$(busy_ticks)
    start=$(date +%s%N)
    "$@" > "$LOG" 2>&1 || { echo "FAILED: $* (tail of $LOG below)" >&2; tail -5 "$LOG" >&2; exit 1; }
    end=$(date +%s%N)
    awk -v ns=$((end - start)) -v t=$(($(busy_ticks) - busy)) -v hz="$TICKS" 'BEGIN { printf "%.2f %.2f", ns / 1e9, t / hz }'
}
wall_of() { echo "${1% *}"; }
cpu_of() { echo "${1#* }"; }
timestamp() { grep -o 'Backup Timestamp = [0-9]*' "$LOG" | grep -o '[0-9]*$'; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }

# Each round's times, for the medians at the end: one round moves by tenths of a second on a small VM.
TIMES=$WORK/rounds-times
: > "$TIMES"
# median <awk expression of $1..$9>: the median of that ratio over the rounds so far.
median() {
    awk "{ print $1 }" "$TIMES" | sort -g | awk '{ v[NR] = $1 } END { printf "%.3fx", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

source_print=$(fingerprint "$DB")
echo "database $DB: $(echo "$source_print" | wc -l) tables; plugin $PLUGIN; $ROUNDS rounds"
for round in $(seq "$ROUNDS"); do
    took=$(seconds gpbackup --dbname "$DB" --backup-dir "$WORK/local"); ts_local=$(timestamp)
    b_local=$(wall_of "$took"); c_local=$(cpu_of "$took")
    # Alternate which plugin goes first: the second finds the caches the first warmed.
    order=(floor ours); [ $((round % 2)) = 0 ] && order=(ours floor)
    declare -A b r ts c
    for who in "${order[@]}"; do
        config=$CFG; [ "$who" = floor ] && config=$WORK/floor.yaml
        took=$(seconds gpbackup --dbname "$DB" --plugin-config "$config"); ts[$who]=$(timestamp)
        b[$who]=$(wall_of "$took"); c[$who]=$(cpu_of "$took")
    done
    for who in local "${order[@]}"; do
        PGOPTIONS="-c client_min_messages=warning" dropdb --if-exists "${DB}_lab_$who"
    done
    took=$(seconds gprestore --timestamp "$ts_local" --backup-dir "$WORK/local" --redirect-db "${DB}_lab_local" --create-db)
    r_local=$(wall_of "$took")
    for who in "${order[@]}"; do
        config=$CFG; [ "$who" = floor ] && config=$WORK/floor.yaml
        took=$(seconds gprestore --timestamp "${ts[$who]}" --plugin-config "$config" --redirect-db "${DB}_lab_$who" --create-db)
        r[$who]=$(wall_of "$took")
    done
    for who in local "${order[@]}"; do
        [ "$(fingerprint "${DB}_lab_$who")" = "$source_print" ] || { echo "round $round: ${DB}_lab_$who differs from $DB" >&2; exit 1; }
    done
    echo "${b[floor]} ${b[ours]} $b_local ${r[floor]} ${r[ours]} $r_local ${c[floor]} ${c[ours]} $c_local" >> "$TIMES"
    echo "round $round: gpbackup local ${b_local}s, floor ${b[floor]}s ($(ratio "${b[floor]}" "$b_local")), ours ${b[ours]}s ($(ratio "${b[ours]}" "$b_local"))" \
         "(machine CPU local ${c_local}s, floor ${c[floor]}s, ours ${c[ours]}s)" \
         "| gprestore local ${r_local}s, floor ${r[floor]}s ($(ratio "${r[floor]}" "$r_local")), ours ${r[ours]}s ($(ratio "${r[ours]}" "$r_local"))" \
         "| restored tables identical"
    rm -rf "$WORK/local"/* "$WORK/floor-store"
    "$PLUGIN" delete_backup "$CFG" "${ts[ours]}"
done
echo "medians of $ROUNDS rounds (each ratio to its round's local time): gpbackup floor $(median '$1 / $3'), ours $(median '$2 / $3')" \
     "| gprestore floor $(median '$4 / $6'), ours $(median '$5 / $6')" \
     "| gpbackup's machine CPU against the local one's: floor $(median '$7 / $9'), ours $(median '$8 / $9')"
