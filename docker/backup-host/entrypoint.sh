#!/bin/sh
# Start the backup host's sshd in the foreground.
#
# Used as the docker backup-host entrypoint and, unchanged, by the test
# fixture, `make demo` and the bench. Settings come from the environment:
#   SSHD_DIR          where host keys, the generated sshd_config and the pid live (kept across runs)
#   SSHD_PORT         port to listen on (22)
#   SSHD_LISTEN       address to listen on (0.0.0.0)
#   AUTHORIZED_KEYS   authorized_keys file for the backup user
#   BACKUP_USER       user to create if missing (only when running as root); empty = none
#   REMOTE_DIR        directory to create for backups, owned by BACKUP_USER; empty = none
#   SSHD_MAX_STARTUPS sshd MaxStartups (OpenSSH default 10:30:100)
#   HOST_KEYS_PUBLISH_DIR  copy the PUBLIC host keys there, for clients to build known_hosts
#                     without ever seeing the private keys (docker-compose.yml); empty = none
set -eu
here=$(cd "$(dirname "$0")" && pwd)
SSHD_DIR=${SSHD_DIR:-/var/lib/backup-host}
SSHD_PORT=${SSHD_PORT:-22}
SSHD_LISTEN=${SSHD_LISTEN:-0.0.0.0}
AUTHORIZED_KEYS=${AUTHORIZED_KEYS:-/etc/backup-host/authorized_keys}
BACKUP_USER=${BACKUP_USER:-}
REMOTE_DIR=${REMOTE_DIR:-}
SSHD_MAX_STARTUPS=${SSHD_MAX_STARTUPS:-10:30:100}
HOST_KEYS_PUBLISH_DIR=${HOST_KEYS_PUBLISH_DIR:-}

mkdir -p "$SSHD_DIR"
# Host keys are made once and kept, so clients' known_hosts stay valid across restarts.
for type in ed25519 ecdsa; do
  [ -f "$SSHD_DIR/ssh_host_${type}_key" ] || ssh-keygen -q -t "$type" -N '' -f "$SSHD_DIR/ssh_host_${type}_key"
done
if [ -n "$HOST_KEYS_PUBLISH_DIR" ]; then
  mkdir -p "$HOST_KEYS_PUBLISH_DIR"
  for type in ed25519 ecdsa; do
    cp "$SSHD_DIR/ssh_host_${type}_key.pub" "$HOST_KEYS_PUBLISH_DIR/"
    chmod 644 "$HOST_KEYS_PUBLISH_DIR/ssh_host_${type}_key.pub"
  done
fi

if [ "$(id -u)" = 0 ]; then
  mkdir -p /run/sshd  # privilege separation directory sshd insists on as root
  if [ -n "$BACKUP_USER" ] && ! id "$BACKUP_USER" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/sh "$BACKUP_USER"
    # A locked account (no password) cannot log in over ssh even with a key; '*' keeps it key-only.
    usermod -p '*' "$BACKUP_USER"
  fi
fi
if [ -n "$REMOTE_DIR" ]; then
  mkdir -p "$REMOTE_DIR"
  if [ -n "$BACKUP_USER" ] && [ "$(id -u)" = 0 ]; then chown "$BACKUP_USER" "$REMOTE_DIR"; fi
fi

sed -e "s|@SSHD_PORT@|$SSHD_PORT|" -e "s|@SSHD_LISTEN@|$SSHD_LISTEN|" -e "s|@SSHD_DIR@|$SSHD_DIR|g" \
    -e "s|@AUTHORIZED_KEYS@|$AUTHORIZED_KEYS|" -e "s|@SSHD_MAX_STARTUPS@|$SSHD_MAX_STARTUPS|" \
    "$here/sshd_config.template" > "$SSHD_DIR/sshd_config"
exec /usr/sbin/sshd -D -e -f "$SSHD_DIR/sshd_config"
