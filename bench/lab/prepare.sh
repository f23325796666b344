#!/bin/bash
# Make a lab cluster (../shared/greenplum-lab, built and started by its setup.sh) ready for the lab scripts
# beside this one: this source tree's plugin installed where the cluster user can run it, a plugin config
# for the lab's own sshd as the backup host, and the per-table database of bench/RESULTS.md. Each run
# reinstalls the plugin from the tracked files as they are in the working tree (to measure a change: edit,
# `git add` any new file, run this again); the rest is made only where missing.
#
#   sudo bash bench/lab/prepare.sh [lab prefix, default /opt/gplab]
#
# Writes, under the lab's work directory (<lab prefix>/work):
#   sftp.yaml     the default config: 127.0.0.1 as the cluster user, with the lab's key and known_hosts
#   sftp-store/   its remote_dir; sftp-logs/ its log_dir
#   bench-lab/    these scripts, where the cluster user can read them
# and two databases for rounds.sh: gplab_pt, 100 tables x 2,000 rows (~22 KB of gzip per table and
# segment), the one the rounds of "The lab's 1.5x" in bench/RESULTS.md back up table by table, and
# gplab_big, 40 tables x 50,000 rows (~0.7 MB of gzip per table and segment), larger table files.
set -euo pipefail
LAB=${1:-/opt/gplab}
SOURCE=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ "$(id -u)" = 0 ] || { echo "prepare.sh: run as root (it installs into $LAB and runs commands as the cluster user)" >&2; exit 1; }
[ -r "$LAB/lab.conf" ] || { echo "prepare.sh: no lab at $LAB ($LAB/lab.conf missing): build it with ../shared/greenplum-lab/setup.sh" >&2; exit 1; }
# shellcheck source=/dev/null
. "$LAB/lab.conf"  # GPUSER, SSH_PORT
WORK=$LAB/work
PLUGIN_PREFIX=$LAB/sftp-plugin
as_gp() { su - "$GPUSER" -c ". $LAB/env.sh; $*"; }

# The plugin's virtualenv takes its interpreter by a link to it: the cluster user must be able to run
# that one. root's own Python often lives under /root (pyenv), which no other user can reach.
PYTHON=${PYTHON:-/usr/bin/python3}
su "$GPUSER" -s /bin/sh -c "$PYTHON -c ''" 2>/dev/null \
    || { echo "prepare.sh: $GPUSER cannot run $PYTHON: set PYTHON to a Python 3 it can run" >&2; exit 1; }
# pip builds from a copy of the tracked files (what a clone has: no .venv or build leftovers) that the
# cluster user's reads never depend on; the copy goes once installed.
copy=$(mktemp -d)
trap 'rm -rf "$copy"' EXIT
git -C "$SOURCE" ls-files -z | (cd "$SOURCE" && xargs -0 cp --parents -t "$copy")
rm -rf "$PLUGIN_PREFIX"
PYTHON=$PYTHON sh "$SOURCE/scripts/install.sh" "$PLUGIN_PREFIX" "$copy" | tail -n 1
chmod -R a+rX "$PLUGIN_PREFIX"
EXE=$PLUGIN_PREFIX/bin/gpbackup_sftp_plugin
echo "installed: $(as_gp "$EXE --version") from $(git -C "$SOURCE" describe --always --dirty)"

install -d -o "$GPUSER" -m 700 "$WORK/sftp-store" "$WORK/sftp-logs"
if [ ! -e "$WORK/sftp.yaml" ]; then
    cat > "$WORK/sftp.yaml" <<EOF
executablepath: $EXE
options:
  hostname: 127.0.0.1
  port: $SSH_PORT
  username: $GPUSER
  remote_dir: $WORK/sftp-store
  identity_file: ~/.ssh/id_gplab
  known_hosts_file: ~/.ssh/known_hosts_gplab
  log_dir: $WORK/sftp-logs
EOF
    chown "$GPUSER" "$WORK/sftp.yaml"
fi
echo "config: $WORK/sftp.yaml"

# database <name> <tables> <rows>: created with that many tables of that many rows each, where missing.
database() {
    if [ "$(as_gp "psql -At -d postgres -c \"select count(*) from pg_database where datname = '$1'\"")" = 0 ]; then
        as_gp "createdb $1 && psql -q -d $1" <<EOF
DO \$\$
BEGIN
  FOR i IN 1..$2 LOOP
    EXECUTE format('CREATE TABLE t%s (id int, name text, amount numeric, created timestamp) DISTRIBUTED BY (id)', i);
    EXECUTE format('INSERT INTO t%s SELECT g, md5(g::text || %s), g * 1.5, now() FROM generate_series(1, $3) g', i, i);
  END LOOP;
END \$\$;
EOF
    fi
    echo "database $1: $(as_gp "psql -At -d $1 -c \"select count(*) from pg_tables where schemaname = 'public'\"") tables"
}
database gplab_pt 100 2000
database gplab_big 40 50000
rm -rf "$WORK/bench-lab"
cp -r "$SOURCE/bench/lab" "$WORK/bench-lab"
chmod -R a+rX "$WORK/bench-lab"
echo "next, as $GPUSER: . $LAB/env.sh; bash $WORK/bench-lab/rounds.sh $WORK/sftp.yaml gplab_pt 4"
