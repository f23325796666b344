"""Run a command and write its peak RSS, in KiB, to a file: ``python -S peak_rss.py <file> <argv...>``.

Why not the bench's own ``wait4``: a child the bench spawns starts as a copy of
the bench (vfork or fork), and exec records that address space's high-water
mark as the child's before its own begins, so ``ru_maxrss`` of any child of
the bench reads at least the bench's peak (hundreds of MiB once it has hashed a
stream). This small process forks the command instead: what it inherits is
this process's few MiB, below any figure the bench reports.

Exits with the command's exit code (128 + N if signal N ended it). Kill this
process's group, not only this process, to stop the command with it.
"""

import os
import sys


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    with open(out, "w") as handle:
        handle.write(f"{usage.ru_maxrss}\n")  # KiB on Linux
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main())
