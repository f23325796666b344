"""SIGINT during a plugin call: shut the SSH connection down first, then raise KeyboardInterrupt.

Python raises KeyboardInterrupt wherever the main thread is: maybe halfway
through sending an SSH packet, or inside paramiko between taking a lock and the
code that releases it. Such a session never answers again, and the cleanup on
the way out (close the remote file, remove the temporary one) would wait on it
for io_timeout per request, or for ever when a lock is left taken. With the
connection shut down first, every such wait fails at once; a temporary file
left behind is removed by cleanup_plugin_for_backup, as after SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def interrupt_aborts(abort: Callable[[], None]) -> Iterator[None]:
    """While inside, SIGINT calls `abort` (which must neither lock nor wait), then raises KeyboardInterrupt.

    Once fired, SIGINT stays ignored: the call is already ending, and a second
    one would only cut its cleanup and its one line on stderr short. A SIGINT
    ignored or handled by whoever started us is left as it is.
    """
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    fired = False

    def on_interrupt(_signum: int, _frame: object) -> None:
        nonlocal fired
        fired = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        abort()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        if not fired:
            signal.signal(signal.SIGINT, signal.default_int_handler)
