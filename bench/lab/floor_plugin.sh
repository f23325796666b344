#!/bin/sh
# The least a gpbackup storage plugin can do: `cat` into a local directory, with shell builtins only
# (one exec of sh per call, then cat replaces it). No network, no checksums, no fsync. Its time on a
# cluster is the floor under any plugin's: what gpbackup itself spends on using a plugin at all
# (copying the config to every host, one process per call). bench/lab/rounds.sh runs it beside ours.
# Stores under floor-store/ next to the config (gpbackup's copies of the config sit beside the original).
set -e
D="${2%/*}/floor-store"
stored() { dir=${1%/*}; ts=${dir##*/}; F="$D/${ts%??????}/$ts/${1##*/}"; }
case "$1" in
  plugin_api_version) echo 0.4.0 ;;
  --version) echo "floor_plugin version 1.0" ;;
  setup_plugin_for_backup) ts=${3##*/}; mkdir -p "$D/${ts%??????}/$ts" ;;
  setup_plugin_for_restore) mkdir -p "$3" ;;
  cleanup_plugin_for_backup|cleanup_plugin_for_restore) ;;
  backup_file) stored "$3"; exec cat "$3" > "$F" ;;
  restore_file) stored "$3"; exec cat "$F" > "$3" ;;
  backup_data) stored "$3"; exec cat > "$F" ;;
  restore_data) stored "$3"; exec cat "$F" ;;
  delete_backup) ts=$3; rm -rf "${D:?}/${ts%??????}/$ts" ;;
  *) echo "floor_plugin: $1 is not supported" >&2; exit 1 ;;
esac
