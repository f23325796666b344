#!/bin/bash
# A gpbackup and a gprestore on a real cluster (../shared/greenplum-lab) while the backup host keeps losing
# the plugin's SSH sessions: every INTERVAL seconds, each SFTP session of the backup user there (sftp-server
# and the sshd process that serves it) is SIGKILLed, as a restarted backup host or a NAT timeout would drop
# them. Kept sessions turn out dead at their next call, and calls lose theirs mid-stream. Both runs must
# succeed, and the restored database must equal the source, table by table (rows and md5).
#
#   . /opt/gplab/env.sh   # as the cluster user
#   bash bench/lab/chaos.sh <our plugin config.yaml> <database> [interval, default 0.3] [-- gpbackup flags]
#
# The sessions are killed on this machine, which on the lab is the backup host too; elsewhere set
# ON_BACKUP_HOST to the ssh command that reaches it as the backup user (ON_BACKUP_HOST="ssh backup@nas"):
# one login per interval. The killed sessions are counted; the restored copy is dropped at the end, the
# backup deleted with delete_backup.
set -euo pipefail
CFG=$(readlink -f "${1:?usage: chaos.sh <plugin config> <database> [interval] [-- gpbackup flags]}")
DB=${2:?usage: chaos.sh <plugin config> <database> [interval] [-- gpbackup flags]}
shift 2
INTERVAL=0.3
if [ $# -gt 0 ] && [ "$1" != -- ]; then INTERVAL=$1; shift; fi
[ "${1:-}" = -- ] && shift
FLAGS=("$@")
. "$(dirname "${BASH_SOURCE[0]}")/lab.sh"
PLUGIN=$(executable_of "$CFG")
WORK=$(mktemp -d)
trap 'touch "$WORK/stop"; wait; rm -rf "$WORK"' EXIT
# What runs on the backup host each interval: kill each SFTP session of this user, print how many.
KILL_SESSIONS='n=0; for p in $(pgrep -u "$(id -un)" -x sftp-server); do
  kill -KILL "$(ps -o ppid= -p "$p" | tr -d " ")" "$p" 2>/dev/null && n=$((n + 1)); done; echo $n'

# killer: until $WORK/stop exists, kill the sessions every INTERVAL; the total goes to $WORK/killed.
killer() {
    local total=0 n
    rm -f "$WORK/stop"
    while [ ! -e "$WORK/stop" ]; do
        sleep "$INTERVAL"
        n=$(${ON_BACKUP_HOST:-bash -c} "$KILL_SESSIONS" 2>/dev/null || echo 0)
        total=$((total + n))
    done
    echo "$total" > "$WORK/killed"
}

# under_fire <name> <command...>: run it with the killer going; print its time, sessions killed and result.
under_fire() {
    local name=$1 start end
    shift
    killer &
    start=$(date +%s%N)
    if "$@" > "$WORK/$name.log" 2>&1; then :; else
        touch "$WORK/stop"; wait
        echo "$name FAILED with $(cat "$WORK/killed") sessions killed (tail of its output below)" >&2
        tail -5 "$WORK/$name.log" >&2
        exit 1
    fi
    end=$(date +%s%N)
    touch "$WORK/stop"; wait
    awk -v ns=$((end - start)) -v k="$(cat "$WORK/killed")" -v what="$name" \
        'BEGIN { printf "%s: %.2f s, %d sessions killed, succeeded\n", what, ns / 1e9, k }'
}

echo "database $DB, plugin $PLUGIN, sessions killed every ${INTERVAL} s, gpbackup flags: ${FLAGS[*]:-none}"
under_fire gpbackup gpbackup --dbname "$DB" --plugin-config "$CFG" "${FLAGS[@]}"
TS=$(grep -o 'Backup Timestamp = [0-9]*' "$WORK/gpbackup.log" | grep -o '[0-9]*$')
COPY=${DB}_chaos
PGOPTIONS="-c client_min_messages=warning" dropdb --if-exists "$COPY"
under_fire gprestore gprestore --timestamp "$TS" --plugin-config "$CFG" --redirect-db "$COPY" --create-db
source_print=$(fingerprint "$DB")
if [ "$(fingerprint "$COPY")" = "$source_print" ]; then
    echo "restored $(echo "$source_print" | wc -l) tables: identical to $DB"
else
    echo "restored $COPY differs from $DB" >&2
    exit 1
fi
PGOPTIONS="-c client_min_messages=warning" dropdb "$COPY"
"$PLUGIN" delete_backup "$CFG" "$TS"
