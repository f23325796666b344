#!/bin/sh
# Entrypoint of the docker "segment" service: a stand-in for a Greenplum host
# that uses the plugin against the backup-host service.
#
#   segment.sh demo            (default) exchange keys, run `check`, then the same
#                              round trip as `make demo` (python -m scripts.demo --host ...)
#   segment.sh authorize-key   append the public key on stdin to the backup host's
#                              authorized_keys (to let a real Greenplum host in)
#   segment.sh <command...>    run any other command, e.g. bash
#
# Key exchange, all through volumes (see docker-compose.yml):
#   - RUN_AS's key pair is generated here, once per container; its public half is
#     appended to AUTHORIZED_KEYS, a volume the backup host mounts read-only as its
#     authorized_keys (sshd reads that file at each login, so no restart is needed);
#   - the backup host publishes its PUBLIC host keys into HOST_KEYS_DIR (entrypoint.sh,
#     HOST_KEYS_PUBLISH_DIR); known_hosts is built from them, so the host key is
#     verified, never trusted on first use. Only if that volume is missing do we fall
#     back to ssh-keyscan, which trusts whatever answers: acceptable in this throwaway
#     environment only, and said so loudly.
# The backup host may still be starting (nothing makes compose wait for it with podman):
# the script waits up to HOST_WAIT seconds (30) for the published key and for sshd to answer.
set -eu
PLUGIN_PREFIX=${PLUGIN_PREFIX:-/usr/local/gpbackup_sftp_plugin}
SOURCE_DIR=${SOURCE_DIR:-/opt/gpbackup_sftp_plugin/src}
BACKUP_HOST=${BACKUP_HOST:-backup-host}
BACKUP_PORT=${BACKUP_PORT:-22}
BACKUP_USER=${BACKUP_USER:-gpbackup}
REMOTE_DIR=${REMOTE_DIR:-/srv/gpbackup}
AUTHORIZED_KEYS=${AUTHORIZED_KEYS:-/client-keys/authorized_keys}
HOST_KEYS_DIR=${HOST_KEYS_DIR:-/backup-host-keys}
RUN_AS=${RUN_AS:-gpadmin}
DEMO_ARGS=${DEMO_ARGS:-}
HOST_WAIT=${HOST_WAIT:-30}

as_user() { runuser -u "$RUN_AS" -- "$@"; }

add_authorized_key() {  # <public key line>
  mkdir -p "$(dirname "$AUTHORIZED_KEYS")"
  touch "$AUTHORIZED_KEYS"
  # sshd reads authorized_keys as the backup user: it must be world-readable.
  chmod 644 "$AUTHORIZED_KEYS"
  grep -qxF "$1" "$AUTHORIZED_KEYS" || printf '%s\n' "$1" >>"$AUTHORIZED_KEYS"
}

case "${1:-demo}" in
  demo) ;;
  authorize-key)
    count=0
    while IFS= read -r line; do
      case "$line" in ssh-*|ecdsa-*|sk-*) add_authorized_key "$line"; count=$((count + 1)) ;; esac
    done
    [ "$count" -gt 0 ] || { echo "segment.sh authorize-key: no public key on stdin" >&2; exit 2; }
    echo "added $count key(s) to $AUTHORIZED_KEYS"
    exit 0 ;;
  *) exec "$@" ;;
esac

home=$(getent passwd "$RUN_AS" | cut -d: -f6)
ssh_dir="$home/.ssh"
as_user mkdir -p "$ssh_dir"
chmod 700 "$ssh_dir"
[ -f "$ssh_dir/id_ed25519" ] || as_user ssh-keygen -q -t ed25519 -N '' -C "$RUN_AS@segment" -f "$ssh_dir/id_ed25519"
add_authorized_key "$(cat "$ssh_dir/id_ed25519.pub")"
echo "segment: $RUN_AS's key $(ssh-keygen -lf "$ssh_dir/id_ed25519.pub" | cut -d' ' -f2) is authorized on $BACKUP_HOST"

if [ "$BACKUP_PORT" = 22 ]; then known_name=$BACKUP_HOST; else known_name="[$BACKUP_HOST]:$BACKUP_PORT"; fi
known_hosts="$ssh_dir/known_hosts"
published="$HOST_KEYS_DIR/ssh_host_ed25519_key.pub"
# Nothing may assume that the backup host is up: podman-compose does not wait for depends_on's
# `condition: service_healthy`, and podman runs no healthcheck without systemd. So wait here, up to
# HOST_WAIT seconds in all, for its published host key (when the volume is there), then for sshd to answer.
deadline=$(( $(date +%s) + HOST_WAIT ))
if [ -d "$HOST_KEYS_DIR" ] && [ ! -r "$published" ]; then
  echo "segment: waiting up to ${HOST_WAIT}s for $BACKUP_HOST to publish its host key in $HOST_KEYS_DIR"
  while [ ! -r "$published" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 1; done
fi
scan() { ssh-keyscan -T 2 -t ed25519 -p "$BACKUP_PORT" "$BACKUP_HOST" 2>/dev/null | awk '$2 == "ssh-ed25519" { print $2, $3 }'; }
presented=$(scan)
if [ -z "$presented" ]; then
  echo "segment: waiting up to ${HOST_WAIT}s for sshd on $BACKUP_HOST:$BACKUP_PORT to answer"
  while [ -z "$presented" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 1; presented=$(scan); done
fi
[ -n "$presented" ] || { echo "segment: no SSH server answered on $BACKUP_HOST:$BACKUP_PORT within ${HOST_WAIT}s" >&2; exit 1; }
if [ -r "$published" ]; then
  awk -v name="$known_name" '{ print name, $1, $2 }' "$published" >"$known_hosts"
  echo "segment: trusting $BACKUP_HOST's host key $(ssh-keygen -lf "$published" | cut -d' ' -f2), published by it in $HOST_KEYS_DIR"
else
  echo "segment: WARNING: $published not found; trusting whatever key $BACKUP_HOST:$BACKUP_PORT presents (ssh-keyscan)." \
       "Acceptable only in this throwaway environment: pin host_key_fingerprint on a real cluster."
  printf '%s %s\n' "$known_name" "$presented" >"$known_hosts"
fi
chown "$RUN_AS" "$known_hosts"
chmod 644 "$known_hosts"

# The config a real Greenplum host would use; `check` shows every step of the connection.
config="$home/sftp_plugin.yaml"
cat >"$config" <<EOF
executablepath: $PLUGIN_PREFIX/bin/gpbackup_sftp_plugin
options:
  hostname: $BACKUP_HOST
  port: $BACKUP_PORT
  username: $BACKUP_USER
  remote_dir: $REMOTE_DIR
  identity_file: $ssh_dir/id_ed25519
  known_hosts_file: $known_hosts
  log_dir: $home/gpAdminLogs
  restore_subset: on
EOF
chown "$RUN_AS" "$config"

echo
echo "segment: $PLUGIN_PREFIX/bin/gpbackup_sftp_plugin check $config"
as_user "$PLUGIN_PREFIX/bin/gpbackup_sftp_plugin" check "$config"
echo
echo "segment: the round trip of 'make demo', against $BACKUP_HOST"
# As `make demo` runs it: a module, from the source directory (it imports devtools from there).
cd "$SOURCE_DIR"
# shellcheck disable=SC2086  # DEMO_ARGS is a list of options
exec runuser -u "$RUN_AS" -- "$PLUGIN_PREFIX/bin/python" -m scripts.demo \
  --plugin "$PLUGIN_PREFIX/bin/gpbackup_sftp_plugin" \
  --host "$BACKUP_HOST" --port "$BACKUP_PORT" --user "$BACKUP_USER" --remote-dir "$REMOTE_DIR" \
  --identity-file "$ssh_dir/id_ed25519" --known-hosts "$known_hosts" $DEMO_ARGS
