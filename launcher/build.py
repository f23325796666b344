"""Build the compiled client (gpbackup_sftp_plugin.c) for the Python that runs the plugin.

Run with that Python, after the package is installed in it:

    <venv>/bin/python -I launcher/build.py <output path>

The client must name the fork server exactly as the Python code does, so
every constant and the code digest's inputs (this interpreter, its version,
the package and site directories) are taken from the installed package and
written into launcher_config.h; nothing is restated by hand. Before the
client is put in place, a self-test build computes the code digest and the
routes of a few config paths, and they must equal what the Python code
computes: a client that disagrees would never be served, so it is not
installed. The output is replaced atomically. Exit 0 when installed; else one
line on stderr and exit 1, and the output is left as it was (a Python client
keeps serving).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

from sftp_plugin import __version__, cli, forkserver

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "gpbackup_sftp_plugin.c")
# Warnings are errors: the client is small, and a warning in it is a bug in waiting.
CFLAGS = ("-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror")
# Linked statically where the toolchain can (libc.a and libz.a: Debian's libc6-dev and zlib1g-dev have
# them, RHEL's glibc-static and zlib-static), else dynamically: gpbackup execs the client once per table
# and segment, and a dynamic one spends as much again in the loader as in its own work (perf stat on the
# lab, 500 runs of plugin_api_version: 0.65-0.80 ms of CPU dynamic, 0.38 ms static; a whole per-table
# call's callers 0.39 ms less). Position-independent, so its addresses are still randomised.
STATIC = ("-static-pie",)


def c_string(text: str) -> str:
    """A C string literal of `text`'s UTF-8 bytes (three-digit octal escapes never run into what follows)."""
    out = []
    for byte in text.encode():
        char = chr(byte)
        out.append(char if 0x20 <= byte < 0x7F and char not in '"\\?' else f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def c_strings(items: list[str] | tuple[str, ...]) -> str:
    return "{" + ", ".join(c_string(item) for item in items) + "}"


def config_header() -> str:
    """launcher_config.h: what the client takes from the Python code."""
    package, site_dirs = forkserver.digest_sources()
    lost = forkserver.worker_lost()
    values = {
        "PLUGIN_NAME": c_string(cli.PLUGIN_NAME),
        "PACKAGE_VERSION": c_string(__version__),
        "PYTHON_EXE": c_string(sys.executable),
        "PYTHON_VERSION": c_string(sys.version),
        "PACKAGE_DIR": c_string(package),
        "SITE_DIRS": c_strings(site_dirs),
        "DEPENDENCIES": c_strings(forkserver.DEPENDENCIES),
        "METADATA_SUFFIXES": c_strings(forkserver._METADATA_SUFFIXES),
        "MAGIC": c_string(forkserver.MAGIC.decode()),
        "STARTED": repr(forkserver.STARTED.decode()),
        "QUEUED": repr(forkserver.QUEUED.decode()),
        "ENDED": repr(forkserver.ENDED.decode()),
        "START_TIMEOUT_SECONDS": str(int(forkserver.START_TIMEOUT)),
        "MAX_SOCKET_PATH": str(forkserver.MAX_SOCKET_PATH),
        "ROUTE_CONTENT_LIMIT": str(cli.ROUTE_CONTENT_LIMIT),
        "FORWARDED_SIGNALS": "{" + ", ".join(signal.Signals(sig).name for sig in forkserver.FORWARDED_SIGNALS) + "}",
        "DELEGATED_COMMANDS": c_strings(tuple(cli.COMMANDS)),
        "VERSION_COMMANDS": "{" + ", ".join(f"{{{c_string(name)}, {c_string(text)}}}"
                                            for name, text in cli.VERSION_COMMANDS.items()) + "}",
        "WORKER_LOST_MESSAGE": c_string(" ".join(str(lost).split())),
        "WORKER_LOST_EXIT_CODE": str(lost.exit_code),
        "INTERRUPTED_MESSAGE": c_string(cli.INTERRUPTED),
        "INTERRUPTED_EXIT_CODE": str(cli.INTERRUPTED_EXIT_CODE),
    }
    lines = ["/* Written by launcher/build.py from the installed Python package: do not edit. */"]
    lines += [f"#define {name} {value}" for name, value in values.items()]
    return "\n".join(lines) + "\n"


def compile_client(workdir: str, output: str, *flags: str) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise BuildError("no C compiler (cc) found")
    command = [compiler, *CFLAGS, *flags, "-I", workdir, "-o", output, SOURCE, "-lz"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        first = next((line for line in lines if "error" in line), lines[0] if lines else "no message")
        hint = " (zlib's header is in Debian's zlib1g-dev)" if "zlib" in result.stderr else ""
        raise BuildError(f"{os.path.basename(compiler)} failed: {first}{hint}")


# Config paths whose routes the self-test compares: absolute, relative, with "." and "..", two and three
# leading slashes (normpath keeps two), a directory, a missing file and the empty path.
SELF_TEST_PATHS = ("{config}", "sample.yaml", "./x/../sample.yaml", "//{workdir}/./sample.yaml",
                   "///{workdir}//sample.yaml", "../..", ".", "missing.yaml", "")


def self_test(binary: str, workdir: str) -> None:
    """The compiled digest and routes must equal the Python code's, or the client is never served.
    Run in `workdir` and in "/" (a cwd that ends in a slash)."""
    config = os.path.join(workdir, "sample.yaml")
    with open(config, "w") as handle:
        handle.write("host: example\n")
    paths = [path.format(config=config, workdir=workdir.lstrip("/")) for path in SELF_TEST_PATHS]
    previous = os.getcwd()
    try:
        for cwd in (workdir, "/"):
            result = subprocess.run([binary, *paths], cwd=cwd, capture_output=True, text=True, check=False)
            os.chdir(cwd)
            expected = [forkserver.code_digest(fresh=True)]
            expected += [forkserver.route_of(cli.route(path)).hex() for path in paths]
            got = result.stdout.split("\n")[:-1]
            if result.returncode != 0 or got != expected:
                raise BuildError(f"the compiled client disagrees with the Python code in {cwd}: {got} != {expected}")
    finally:
        os.chdir(previous)


class BuildError(Exception):
    pass


def build(output: str) -> None:
    with tempfile.TemporaryDirectory(prefix="gpbackup_sftp_launcher-") as workdir:
        with open(os.path.join(workdir, "launcher_config.h"), "w") as handle:
            handle.write(config_header())
        tester = os.path.join(workdir, "self-test")
        self_test_flags = ("-DLAUNCHER_SELF_TEST", "-Wno-unused-function")
        link = STATIC
        try:  # the self-test is linked as the client will be, so it tests that build
            compile_client(workdir, tester, *link, *self_test_flags)
        except BuildError:
            link = ()
            compile_client(workdir, tester, *self_test_flags)
        self_test(tester, workdir)
        built = os.path.join(workdir, "client")
        compile_client(workdir, built, *link)
        staged = f"{output}.building"
        shutil.copyfile(built, staged)
        os.chmod(staged, 0o755)
        os.replace(staged, output)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: <venv python> -I launcher/build.py <output path>", file=sys.stderr)
        return 2
    try:
        build(argv[0])
    except (BuildError, OSError) as err:
        print(f"launcher/build.py: compiled client not installed ({err}); the Python client serves", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
