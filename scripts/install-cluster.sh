#!/bin/bash
# Install gpbackup_sftp_plugin at the same absolute PREFIX on every host of a
# Greenplum cluster, over ssh, and print the executablepath for the plugin config.
#
#   scripts/install-cluster.sh <hostfile> [<prefix>]
#
# <hostfile>  a Greenplum host file: one hostname per line; '#' comments and
#             blank lines are ignored (the gpssh/gpseginstall format). List the
#             coordinator too: gpbackup runs the plugin there as well.
# <prefix>    absolute install directory (default /usr/local/gpbackup_sftp_plugin);
#             the ssh user must be allowed to create it on every host.
#
# For each host this copies the plugin's source (tar over ssh) into a temporary
# directory there, runs scripts/install.sh <prefix> <that directory> on the host
# (its own virtualenv, from PyPI or the host's pip configuration), checks the
# installed executable answers --version, and removes the copy. Hosts are done
# in parallel; each host's output goes to a log shown only if it fails.
#
# Environment:
#   SSH_OPTS        extra ssh options, word-split, e.g. "-p 2222 -i ~/.ssh/id -o UserKnownHostsFile=..."
#   PARALLEL        hosts installed at once (default 8)
#   REMOTE_PYTHON   python3 to build the virtualenv with on the hosts (default python3)
set -eu

usage() {
  echo "usage: $0 <hostfile> [<prefix>]   (environment: SSH_OPTS, PARALLEL, REMOTE_PYTHON)" >&2
  exit 2
}
[ $# -ge 1 ] && [ $# -le 2 ] || usage
HOSTFILE=$1
PREFIX=${2:-/usr/local/gpbackup_sftp_plugin}
PARALLEL=${PARALLEL:-8}
REMOTE_PYTHON=${REMOTE_PYTHON:-python3}
SOURCE=$(cd "$(dirname "$0")/.." && pwd)
# BatchMode: never stop at a password prompt (hosts run in parallel); use keys, as gpssh does.
read -r -a ssh_opts <<<"-o BatchMode=yes ${SSH_OPTS:-}"

case "$PREFIX" in
  /*) ;;
  *) echo "install-cluster.sh: prefix must be an absolute path (gpbackup requires executablepath to be), got: $PREFIX" >&2; exit 2 ;;
esac
case "$PREFIX$REMOTE_PYTHON" in
  *\'*) echo "install-cluster.sh: prefix and REMOTE_PYTHON must not contain a single quote" >&2; exit 2 ;;
esac
[ -r "$HOSTFILE" ] || { echo "install-cluster.sh: cannot read host file $HOSTFILE" >&2; exit 2; }
case "$PARALLEL" in ''|*[!0-9]*|0) echo "install-cluster.sh: PARALLEL must be a positive number" >&2; exit 2 ;; esac

# Hostnames: strip comments and blanks, keep the first word, drop duplicates, keep order.
hosts=()
while IFS= read -r host; do
  hosts+=("$host")
done < <(sed -e 's/#.*//' "$HOSTFILE" | awk 'NF { if (!seen[$1]++) print $1 }')
[ ${#hosts[@]} -gt 0 ] || { echo "install-cluster.sh: no hostnames in $HOSTFILE" >&2; exit 2; }

# What a build needs; the virtualenv, caches and test files stay home.
members=()
for item in setup.cfg setup.py pyproject.toml README.rst LICENSE MANIFEST.in sftp_plugin scripts/install.sh; do
  [ -e "$SOURCE/$item" ] && members+=("$item")
done

logdir=$(mktemp -d "${TMPDIR:-/tmp}/install-cluster.XXXXXX")
trap 'rm -rf "$logdir"' EXIT

install_one() {  # <index> <host>: all output to the host's log; status in <index>.rc
  local index=$1 host=$2 remote_tmp status=0
  {
    echo "== $host: copying the source"
    remote_tmp=$(ssh "${ssh_opts[@]}" "$host" 'mktemp -d "${TMPDIR:-/tmp}/gpbackup_sftp_plugin_src.XXXXXX"') &&
    tar -C "$SOURCE" --exclude=__pycache__ --exclude='*.pyc' -cf - "${members[@]}" |
      ssh "${ssh_opts[@]}" "$host" "tar -C '$remote_tmp' -xf -" &&
    echo "== $host: scripts/install.sh $PREFIX" &&
    ssh "${ssh_opts[@]}" "$host" "PYTHON='$REMOTE_PYTHON' sh '$remote_tmp/scripts/install.sh' '$PREFIX' '$remote_tmp'" &&
    ssh "${ssh_opts[@]}" "$host" "'$PREFIX/bin/gpbackup_sftp_plugin' --version" >"$logdir/$index.version" ||
      status=1
    if [ -n "${remote_tmp:-}" ]; then
      ssh "${ssh_opts[@]}" "$host" "rm -rf '$remote_tmp'" || echo "== $host: could not remove $remote_tmp"
    fi
  } >"$logdir/$index.log" 2>&1
  echo "$status" >"$logdir/$index.rc"
}

echo "installing gpbackup_sftp_plugin into $PREFIX on ${#hosts[@]} host(s), $PARALLEL at a time"
running=0
for i in "${!hosts[@]}"; do
  install_one "$i" "${hosts[$i]}" &
  running=$((running + 1))
  if [ "$running" -ge "$PARALLEL" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true

failed=0
versions=()
for i in "${!hosts[@]}"; do
  host=${hosts[$i]}
  if [ "$(cat "$logdir/$i.rc" 2>/dev/null)" = 0 ]; then
    version=$(cat "$logdir/$i.version")
    versions+=("$version")
    echo "  $host: ok ($version)"
  else
    failed=$((failed + 1))
    echo "  $host: FAILED; its output:" >&2
    sed -e 's/^/    /' "$logdir/$i.log" >&2
  fi
done

if [ "$failed" -gt 0 ]; then
  echo "install-cluster.sh: $failed of ${#hosts[@]} host(s) failed; fix them and run again (installing twice is safe)" >&2
  exit 1
fi
if [ "$(printf '%s\n' "${versions[@]}" | sort -u | wc -l)" -ne 1 ]; then
  echo "install-cluster.sh: the hosts report different versions; every host must run the same plugin" >&2
  exit 1
fi
echo "installed on all ${#hosts[@]} host(s). Put this in the plugin config:"
echo "executablepath: $PREFIX/bin/gpbackup_sftp_plugin"
