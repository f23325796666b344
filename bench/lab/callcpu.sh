#!/bin/bash
# What one per-table backup_data costs the machine: N calls one after another, each `gzip -1 | <plugin>
# backup_data` of one segment's share of a gplab_pt table (as a per-table gpbackup runs it), three ways:
# gzip alone into /dev/null, the floor plugin (floor_plugin.sh: cat into a local directory) and ours.
# For each: wall time and machine CPU (/proc/stat) per call; for ours also the CPU per call of each
# process it keeps (fork server and worker, and a slot's monitor before 2026-12-02; on the lab, which is
# its own backup host, sshd and sftp-server), from /proc/<pid>/stat, and of the callers (gzip and the
# plugin's client, bash's `times`).
#
#   . /opt/gplab/env.sh   # as the cluster user, the cluster idle
#   bash bench/lab/callcpu.sh <our plugin config.yaml> [calls, default 300]
#
# The files go to a backup directory of their own under the config's remote_dir (deleted at the end
# with delete_backup) and, for the floor, under $WORK (default: lab-rounds beside the config, as
# rounds.sh). Our fork server is warmed by a few calls first; its processes must be of this user.
set -euo pipefail
CFG=$(readlink -f "${1:?usage: callcpu.sh <plugin config> [calls]}")
N=${2:-300}
WORK=${WORK:-$(dirname "$CFG")/lab-rounds}
. "$(dirname "${BASH_SOURCE[0]}")/lab.sh"
PLUGIN=$(executable_of "$CFG")
floor_in "$WORK"
SOURCE=$WORK/callcpu-source.txt
# One segment's rows of one table, as COPY writes them (~70 KB; ~27 KB once gzipped).
psql -At -d gplab_pt -c "copy (select * from t1 where gp_segment_id = 0) to stdout" > "$SOURCE"
TS=$(date +%Y%m%d%H%M%S)
DIR=$WORK/callcpu/backups/${TS:0:8}/$TS  # gpbackup's layout: the plugins map it onto their own
mkdir -p "$DIR"
"$PLUGIN" setup_plugin_for_backup "$CFG" "$DIR" master 0 > /dev/null
"$WORK/floor_plugin.sh" setup_plugin_for_backup "$WORK/floor.yaml" "$DIR" master 0

# CHILDREN_MS: the CPU of this shell's ended children (bash's `times`, second line), whole ms. `times` must
# run in this shell, not in a $(...) subshell (which has no children): its output goes through a file.
children_ms() {
    times > "$WORK/callcpu-times"
    CHILDREN_MS=$(awk 'NR == 2 { split($0, t, /[ms ]+/); printf "%d", (t[1] * 60 + t[2] + t[3] * 60 + t[4]) * 1000 + 0.5 }' \
        "$WORK/callcpu-times")
}
# Each process of this user whose name is one of ours or the backup host's: "pid name ticks".
kept() {
    local d name stat
    for d in /proc/[0-9]*; do
        name=$(cat "$d/comm" 2>/dev/null) || continue
        case "$name" in gpsftp-*|sftp-server|sshd) ;; *) continue ;; esac
        [ -O "$d" ] || continue
        stat=$(sed 's/.*) //' "$d/stat" 2>/dev/null) || continue
        # shellcheck disable=SC2086
        set -- $stat
        echo "${d#/proc/} $name $((${12} + ${13}))"
    done | sort
}
# run <label> <config or "-"> : N calls; prints wall, machine CPU and callers' CPU per call.
run() {
    local label=$1 config=$2 exe="" start end t0 t1 c0 i
    [ "$config" = - ] || exe=$(executable_of "$config")
    children_ms; c0=$CHILDREN_MS; t0=$(busy_ticks); start=$(date +%s%N)
    for i in $(seq 1 "$N"); do
        if [ -z "$exe" ]; then
            gzip -1 < "$SOURCE" > /dev/null
        else
            gzip -1 < "$SOURCE" | "$exe" backup_data "$config" "$DIR/gpbackup_0_${TS}_${label}_$i.gz"
        fi
    done
    end=$(date +%s%N); t1=$(busy_ticks); children_ms
    awk -v l="$label" -v w=$((end - start)) -v t=$((t1 - t0)) -v c=$((CHILDREN_MS - c0)) -v n="$N" \
        -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%-6s wall %.2f ms, machine CPU %.2f ms, callers %.2f ms per call\n",
        l, w / 1e6 / n, t * 1000 / hz / n, c / n }'
}

for i in 1 2 3; do gzip -1 < "$SOURCE" | "$PLUGIN" backup_data "$CFG" "$DIR/gpbackup_0_${TS}_warm_$i.gz"; done
echo "$N calls each, $(wc -c < "$SOURCE") bytes of COPY text per call ($(gzip -1 < "$SOURCE" | wc -c) gzipped)"
run gzip -
run floor "$WORK/floor.yaml"
before=$(kept)
run ours "$CFG"
after=$(kept)
join <(echo "$before") <(echo "$after") | awk -v n="$N" -v hz="$(getconf CLK_TCK)" '
    { t[$2] += $5 - $3 } END { for (p in t) printf "  ours: %-14s %.2f ms per call\n", p, t[p] * 1000 / hz / n }' | sort
"$PLUGIN" delete_backup "$CFG" "$TS" > /dev/null
rm -rf "$WORK/callcpu" "$WORK/floor-store/${TS:0:8}/$TS" "$SOURCE" "$WORK/callcpu-times"
