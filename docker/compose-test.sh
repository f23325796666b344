#!/usr/bin/env bash
# `make compose-test`: the compose environment of docker/ as a test. It brings backup-host and segment
# up (images built), waits for the segment's round trip, passes only on its "RESULT: OK" and a backup
# host whose sshd logged no error, and tears everything down (`down -v`) whatever happened.
# docker/README.md ("Run it as a test") tells the whole story; in short:
#
# - Engine: `docker compose` where a Docker engine answers, else podman with podman-compose (podman from
#   Debian's packages when missing, podman-compose into the project's virtualenv $VENV).
#   COMPOSE_ENGINE=docker|podman chooses one.
# - Base image: the Dockerfiles' FROM image is used if present, else pulled, else (no registry answers:
#   the air-gapped path) made here with debootstrap from this machine's own apt sources (the release,
#   its -updates and -security suites) and tagged under the FROM name, so nothing is pulled.
# - pip's settings of this machine (index, proxy, CA bundle: PIP_* variables, pip's config files, the
#   extra CA certificates) reach the segment's build as build secrets: mounted for that one step,
#   never in an image layer.
# - Podman on small VMs: runc where crun cannot run (cgroups in hybrid mode), and explicit ulimits
#   where root lacks CAP_SYS_RESOURCE; both per invocation, nothing in the machine's configuration.
#
# Settings: COMPOSE_TEST_TIMEOUT (seconds for the whole run, default 1200), COMPOSE_TEST_PROJECT
# (compose project name, default gpbackup-sftp-test), DEMO_ARGS (passed to the demo), KEEP_WORK=1
# (keep the work directory with the generated files and the full log).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
COMPOSE_FILE=docker/docker-compose.yml
PROJECT=${COMPOSE_TEST_PROJECT:-gpbackup-sftp-test}
TIMEOUT=${COMPOSE_TEST_TIMEOUT:-1200}
ENGINE=${COMPOSE_ENGINE:-}
# What sshd logs when a client goes away uncleanly (see tests/test_clean_disconnect.py).
SSHD_ERRORS='Connection reset|Read error|error:|Connection corrupted|Broken pipe'

say() { printf 'compose-test: %s\n' "$*"; }
die() { say "FAILED: $*" >&2; exit 1; }
as_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (apt-get, debootstrap): run it as root, or provide it first"; }
apt_install() {  # <package>...
  as_root "installing $*"
  say "installing $* (Debian packages)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpbackup-compose-test.XXXXXX")
compose=()
cleanup() {
  rc=$?
  trap - EXIT INT TERM
  if [ "${#compose[@]}" -gt 0 ]; then
    say "tearing down: ${compose[*]} down -v"
    "${compose[@]}" down -v >"$work/down.log" 2>&1 || { say "down -v failed:"; tail -n 20 "$work/down.log"; }
  fi
  if [ "${KEEP_WORK:-0}" = 1 ]; then say "work directory kept: $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the engine -----------------------------------------------------------------------------------
if [ -z "$ENGINE" ]; then
  if command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1 \
      && docker compose version >/dev/null 2>&1; then
    ENGINE=docker
  else
    ENGINE=podman
    say "no Docker engine answers (docker info): using podman with podman-compose"
  fi
fi
case "$ENGINE" in
  docker) engine=(docker) ;;
  podman)
    command -v podman >/dev/null || apt_install podman
    engine=(podman)
    ;;
  *) die "COMPOSE_ENGINE must be docker or podman, not $ENGINE" ;;
esac

podman_global=() podman_run=() podman_build=()
if [ "$ENGINE" = podman ]; then
  # crun refuses a hybrid cgroup setup (v1 controllers with a v2 "unified" hierarchy beside them):
  # "cgroups in hybrid mode not supported". runc runs there.
  if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = tmpfs ] \
      && [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ]; then
    command -v runc >/dev/null || apt_install runc
    podman_global=(--runtime runc)
    say "cgroups in hybrid mode (crun does not support it): runtime runc, for this run only"
  fi
  # Without CAP_SYS_RESOURCE, even root cannot raise a hard limit, and podman asks for more open files
  # and processes than such a machine allows ("setrlimit RLIMIT_NOFILE: Operation not permitted"):
  # explicit ulimits, found once the base image is there (probe_ulimits).
  capeff=$(awk '/^CapEff:/ { print $2 }' /proc/self/status)
  if [ -n "$capeff" ] && [ $(( (16#$capeff >> 24) & 1 )) = 0 ]; then no_sys_resource=1; else no_sys_resource=0; fi
  # The OCI image format has no HEALTHCHECK (podman build drops it with a warning): the docker format
  # keeps backup-host's. (podman runs no healthcheck without systemd anyway, and podman-compose does
  # not wait for service_healthy: segment.sh waits for the backup host itself.)
  podman_build+=(--format docker)
  if ! out=$("${engine[@]}" "${podman_global[@]}" info 2>&1); then
    printf '%s\n' "$out" | tail -n 5 >&2
    die "podman cannot run here (podman info failed)"
  fi
  if [ ! -x "$VENV/bin/podman-compose" ]; then
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    say "installing podman-compose into $VENV"
    "$VENV/bin/pip" install -q 'podman-compose>=1.6,<2'
  fi
  engine+=("${podman_global[@]}")
fi
podman_compose() {  # the compose command, once podman's options are known
  if [ "$ENGINE" = docker ]; then compose=(docker compose -p "$PROJECT" -f "$COMPOSE_FILE"); return; fi
  compose=("$VENV/bin/podman-compose" --no-ansi -p "$PROJECT" -f "$COMPOSE_FILE")
  [ "${#podman_global[@]}" = 0 ] || compose+=(--podman-args "${podman_global[*]}")
  [ "${#podman_run[@]}" = 0 ] || compose+=(--podman-run-args "${podman_run[*]}")
  compose+=(--podman-build-args "${podman_build[*]}")
}
podman_compose
# Leftovers of an interrupted earlier run (containers, volumes) would change the outcome.
"${compose[@]}" down -v >/dev/null 2>&1 || true

# --- the base image -------------------------------------------------------------------------------
base=$(sed -n 's/^FROM[[:space:]]\{1,\}\([^[:space:]]*\).*/\1/p' docker/backup-host/Dockerfile docker/segment/Dockerfile | sort -u)
[ "$(printf '%s\n' "$base" | wc -l)" = 1 ] || die "the Dockerfiles name different base images: $base"

build_base_image() {  # the air-gapped path: $base from this machine's own apt sources
  as_root "making $base with debootstrap"
  case "$base" in
    debian:*) suite=${base#debian:}; suite=${suite%-slim} ;;
    *) die "cannot make $base locally: only debian:<release>[-slim] images can be made with debootstrap" ;;
  esac
  command -v debootstrap >/dev/null || apt_install debootstrap
  targets=$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 'Identifier: Packages' 2>/dev/null | sort -u)
  [ -n "$targets" ] || { apt-get update -qq; targets=$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 'Identifier: Packages' | sort -u); }
  # The release, its -updates and -security suites where this machine's sources have them; for another
  # release, the same mirrors with the suite renamed.
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  uri_of() {  # <suite suffix: "" or -updates or -security>
    printf '%s\n' "$targets" | awk -v a="$suite$1" -v b="$codename$1" '$1 == a { print $2; exit } $1 == b { found = $2 } END { if (found) print found }' | head -n 1
  }
  mirror=$(uri_of "") updates=$(uri_of -updates) security=$(uri_of -security)
  [ -n "$mirror" ] || die "no Debian mirror in this machine's apt sources (apt-get indextargets) to make $base from"
  say "making $base with debootstrap --variant=minbase $suite from this machine's apt sources:" \
      "$mirror${updates:+, $updates ($suite-updates)}${security:+, $security ($suite-security)}"
  rootfs="$work/rootfs"
  debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
  # As the official slim images: no documentation, manual pages or translations in packages installed later.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  rm -f "$rootfs/etc/apt/sources.list"
  {
    printf 'Types: deb\nURIs: %s\nSuites: %s%s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$mirror" "$suite" "$( [ -n "$updates" ] && [ "$updates" = "$mirror" ] && printf ' %s-updates' "$suite")"
    if [ -n "$updates" ] && [ "$updates" != "$mirror" ]; then
      printf '\nTypes: deb\nURIs: %s\nSuites: %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$updates" "$suite"
    fi
    if [ -n "$security" ]; then
      printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$security" "$suite"
    fi
  } >"$rootfs/etc/apt/sources.list.d/debian.sources"
  # The updates and security fixes of the day, as in a published image; then no package lists left.
  chroot "$rootfs" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -y -qq upgrade >/dev/null \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log /var/log/apt/*' \
    >>"$work/debootstrap.log" 2>&1 || { tail -n 20 "$work/debootstrap.log" >&2; die "updating the new $base failed"; }
  # The engine provides these at run time.
  rm -f "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname"
  : >"$rootfs/etc/resolv.conf"
  tar -C "$rootfs" --numeric-owner -cf - . | "${engine[@]}" import --change 'CMD ["bash"]' - "$base" >/dev/null
  rm -rf "$rootfs"
  say "base image $base made locally and tagged (nothing pulled)"
}

if "${engine[@]}" image inspect "$base" >/dev/null 2>&1; then
  say "base image $base: present"
else
  case "$base" in */*) qualified=$base ;; *) qualified=docker.io/library/$base ;; esac
  if timeout 300 "${engine[@]}" pull -q "$qualified" >"$work/pull.log" 2>&1; then
    [ "$qualified" = "$base" ] || "${engine[@]}" tag "$qualified" "$base"
    say "base image $base: pulled"
  else
    say "base image $base: no registry answers ($(tail -n 1 "$work/pull.log" | cut -c1-160))"
    build_base_image
  fi
fi

# podman without CAP_SYS_RESOURCE: the highest limits a container can be given here. The open files of
# this shell; for processes, its hard limit is not always granted (runc may be refused above pid_max).
if [ "$ENGINE" = podman ] && [ "$no_sys_resource" = 1 ]; then
  nofile=$(ulimit -Hn)
  limits=()
  [ "$nofile" = unlimited ] || limits+=(--ulimit "nofile=$nofile:$nofile")
  found=
  for nproc in $(ulimit -Hu) "$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo 32768)" 32768 16384 4096; do
    [ "$nproc" != unlimited ] || continue
    if "${engine[@]}" run --rm "${limits[@]}" --ulimit "nproc=$nproc:$nproc" --entrypoint true "$base" >/dev/null 2>&1; then
      found=$nproc; break
    fi
  done
  [ -n "$found" ] || die "no ulimits found under which podman starts a container here (no CAP_SYS_RESOURCE)"
  limits+=(--ulimit "nproc=$found:$found")
  podman_run=("${limits[@]}") podman_build=("${limits[@]}" "${podman_build[@]}")
  say "no CAP_SYS_RESOURCE: explicit ulimits ${limits[*]}, for this run only"
  podman_compose
fi

# --- pip's settings, for the segment's build ---------------------------------------------------------
# Build secrets (docker-compose.yml: pip_conf, host_ca), files outside the build context, mounted for the
# one RUN step that installs the plugin (segment/Dockerfile), never in a layer or the image history.
"$PYTHON" - "$work/pip.conf" "$work/host-ca.pem" <<'EOF'
import glob, os, subprocess, sys

conf_path, ca_path = sys.argv[1:]
settings = {}
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
for line in listed.stdout.splitlines():  # e.g. global.cert='/etc/ssl/certs/ca-certificates.crt'
    name, _, value = line.partition("=")
    section, _, key = name.partition(".")
    if section in ("global", "install") and value:
        settings[key] = value.strip("'\"")
for key in ("index-url", "extra-index-url", "trusted-host", "proxy", "cert", "find-links", "timeout",
            "default-timeout"):
    value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if value:
        settings[key] = value
# Only what reaches the network: local paths of this machine (find-links, file:// indexes) mean nothing there.
def remote(value):
    kept = [v for v in value.split() if v.startswith(("http://", "https://"))]
    return " ".join(kept)
lines = ["# pip's settings of the machine that built this image (docker/compose-test.sh)", "[global]"]
for key in ("index-url", "extra-index-url", "find-links"):
    if remote(settings.get(key, "")):
        lines.append(f"{key} = {remote(settings[key])}")
for key in ("trusted-host", "proxy"):
    if settings.get(key):
        lines.append(f"{key} = {settings[key]}")
timeout = settings.get("timeout") or settings.get("default-timeout")
if timeout:
    lines.append(f"timeout = {timeout}")
# The CA bundle pip trusts here (PIP_CERT, pip's config, else the system's) and the extra CA certificates.
bundle = settings.get("cert") or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") \
    or "/etc/ssl/certs/ca-certificates.crt"
pems = []
for path in [bundle, *sorted(glob.glob("/usr/local/share/ca-certificates/**/*.crt", recursive=True))]:
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            pems.append(f.read().strip() + "\n")
with open(ca_path, "w") as f:
    f.write("".join(pems))
if pems:
    lines.append("cert = /run/secrets/host_ca")
with open(conf_path, "w") as f:
    f.write("\n".join(lines) + "\n")
EOF
export PIP_CONF_SECRET="$work/pip.conf" HOST_CA_SECRET="$work/host-ca.pem"
say "pip's settings for the build (secret pip_conf): $(grep -v '^#' "$work/pip.conf" | grep -v '^\[' | cut -d' ' -f1 | tr '\n' ' ')"

# A free port for the backup host's published port, so that a running environment is not in the way.
BACKUP_HOST_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export BACKUP_HOST_PORT

# --- up, wait for the result ------------------------------------------------------------------------
remaining=$(( TIMEOUT - ($(date +%s) - start) ))
[ "$remaining" -gt 60 ] || die "no time left for the run (COMPOSE_TEST_TIMEOUT=$TIMEOUT)"
up=(up --build --no-color --abort-on-container-exit --exit-code-from segment)
say "${compose[*]} ${up[*]}"
set +e
timeout --foreground -k 30 "$remaining" "${compose[@]}" "${up[@]}" 2>&1 | tee "$work/up.raw.log"
up_rc=${PIPESTATUS[0]}
set -e
sed 's/\x1b\[[0-9;]*m//g' "$work/up.raw.log" >"$work/up.log"  # any colour left
elapsed=$(( $(date +%s) - start ))
[ "$up_rc" != 124 ] || die "no result within ${TIMEOUT}s (COMPOSE_TEST_TIMEOUT)"
# The segment's own lines: "segment-1  | ..." (docker compose) or "[segment] | ..." (podman-compose).
grep -Eq '^[[:space:]]*(\[segment\]|segment[-_0-9]*)[[:space:]]*\|[[:space:]]*RESULT: OK[[:space:]]*$' "$work/up.log" \
  || die "the segment did not end with RESULT: OK (up exited $up_rc, after ${elapsed}s)"
backup_host_lines=$(grep -E '^[[:space:]]*(\[backup-host\]|backup-host[-_0-9]*)[[:space:]]*\|' "$work/up.log" || true)
errors=$(printf '%s\n' "$backup_host_lines" | grep -Ec "$SSHD_ERRORS" || true)
sessions=$(printf '%s\n' "$backup_host_lines" | grep -c 'Accepted publickey' || true)
say "backup host: $sessions SSH logins, $errors error lines in sshd's log"
if [ "$errors" != 0 ]; then
  printf '%s\n' "$backup_host_lines" | grep -E "$SSHD_ERRORS" | head -n 20 >&2
  die "the backup host's sshd logged $errors error lines (above)"
fi
[ "$up_rc" = 0 ] || die "the segment said RESULT: OK but up exited $up_rc"
say "OK: RESULT: OK from the segment in ${elapsed}s ($ENGINE)"
