"""glibc malloc settings for transfers: keep freed memory for reuse instead of handing it back.

A transfer allocates and frees a few hundred KiB for every SFTP reply or
request and every read from stdin. By default glibc returns free memory at the
top of its heap to the kernel as soon as 128 KiB gather there, and serves
blocks over its (adaptive) mmap threshold with fresh mappings, so the next
allocation faults the same memory in again, page by page: ~50,000 page faults
per 256 MiB restore, a quarter of its CPU time. Keeping the memory cut that to
~10,000 and the CPU time by ~20% (bench/RESULTS.md). Peak memory is unchanged:
the memory kept is memory the transfer already used.

Elsewhere (musl, macOS) there is no mallopt and nothing to tune.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap, not from mappings of their own: above
# the largest block a transfer allocates (a 1 MiB read from stdin, with its copies).
MMAP_THRESHOLD = 4 * 1024 * 1024
# Free memory at the top of the heap kept before giving any back: the 16 MiB
# SSH window of packets a download may buffer, with room to spare.
TRIM_THRESHOLD = 32 * 1024 * 1024


@functools.cache
def keep_freed_memory() -> bool:
    """Apply the thresholds above, once per process; False where the C library has no mallopt."""
    try:
        import ctypes  # here, not at the top: 3 ms that only transfers need

        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError):
        return False
    mmap_set = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    trim_set = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    applied = mmap_set and trim_set
    log.debug("malloc thresholds %s", "set" if applied else "refused")
    return applied
