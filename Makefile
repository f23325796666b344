# One-command entry points. Each target installs what it needs on a fresh
# Debian machine (as root: openssh-server via apt) and a local virtualenv.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PREFIX ?= /usr/local/gpbackup_sftp_plugin

.PHONY: test unit test-oldest lint deps system-deps install bench demo compose-test clean

test: deps lint
	@# pytest exits 5 when it collected no test: that is a failure here, not a pass.
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest ran no test" >&2; exit 1; fi; exit $$rc

# The fast tier alone: tests of the pure modules, in seconds (conftest.py marks each test `unit` or `sshd`).
unit: deps
	$(PY) -m pytest -q -p no:cacheprovider -m unit

# The lowest paramiko setup.cfg allows (sftp_plugin/fastpath: TESTED_PARAMIKO), in a virtualenv of its
# own: the fast packet code needs paramiko >= 3.5, so this runs the suite through paramiko's own code,
# and through the Python client (pip's console script: no compiled client is built here).
OLDEST_VENV ?= .venv-oldest
OLDEST_PARAMIKO ?= 3.4.1
test-oldest: system-deps
	@test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q '.[test]' 'paramiko==$(OLDEST_PARAMIKO)'
	$(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-oldest: pytest ran no test" >&2; exit 1; fi; exit $$rc

lint: deps
	$(VENV)/bin/ruff check sftp_plugin tests bench scripts devtools launcher

deps: system-deps $(VENV)/.package

# OpenSSH server and client: the tests, demo and bench start a real sshd on 127.0.0.1. A C compiler and
# zlib's header: the compiled client (launcher/).
system-deps:
	@if [ ! -x /usr/sbin/sshd ] || ! command -v ssh-keygen >/dev/null || ! command -v sftp >/dev/null \
		|| ! command -v cc >/dev/null || [ ! -f /usr/include/zlib.h ]; then \
		echo "installing openssh-server, openssh-client, gcc and zlib1g-dev"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			openssh-server openssh-client gcc libc6-dev zlib1g-dev; \
	fi

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	touch $@

# The package and its test dependencies, installed as users get it (not
# editable: an editable install adds an import hook that slows every plugin
# call), again whenever its sources change, so tests and the bench run the
# installed console script. pip always rebuilds and reinstalls a local
# directory, so one install per change is enough. Then the compiled client
# replaces the console script, as scripts/install.sh does, and the suite runs
# through it (a failed build fails here); test-oldest keeps the Python client.
$(VENV)/.package: $(VENV)/.installed setup.cfg setup.py pyproject.toml $(wildcard sftp_plugin/*.py sftp_plugin/*/*.py) \
		launcher/gpbackup_sftp_plugin.c launcher/build.py
	$(VENV)/bin/pip install -q '.[test]'
	$(PY) -I launcher/build.py $(VENV)/bin/gpbackup_sftp_plugin
	touch $@

# Plugin vs OpenSSH sftp on a throwaway sshd (tmpfs); e.g. make bench BENCH_ARGS="--size-mib 64 --rounds 1".
bench: deps
	$(PY) -m bench.run $(BENCH_ARGS)

# Back up and restore a simulated cluster through the plugin exactly as gpbackup/gprestore
# call it, against a throwaway sshd on 127.0.0.1, verify every byte, then remove it all.
demo: deps
	$(PY) -m scripts.demo $(DEMO_ARGS)

# The compose environment of docker/ as a test (docker/compose-test.sh, docker/README.md): up with images
# built, the segment's round trip waited for, fails unless it says RESULT: OK (and the backup host's sshd
# logged no error), then down -v whatever happened. `docker compose` where a Docker engine answers, else
# podman (Debian's package) with podman-compose (in $(VENV)); where no registry answers, the base image
# is made with debootstrap from this machine's apt sources.
compose-test: $(VENV)/.installed
	VENV=$(VENV) PYTHON=$(PYTHON) bash docker/compose-test.sh

# Install the plugin for Greenplum at $(PREFIX) (same path on every host).
install:
	scripts/install.sh $(PREFIX)

clean:
	rm -rf $(VENV) build dist *.egg-info
