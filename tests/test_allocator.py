"""allocator.keep_freed_memory: memory a transfer frees is reused, not faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# A download's pattern: a window of a few hundred KiB blocks fills, drains, fills again.
CHURN = """
import resource, sys
from sftp_plugin import allocator
if sys.argv[1] == "tuned":
    assert allocator.keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    window = [b"a" * 300_000 for _ in range(40)]
    del window
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    # A fresh interpreter each: the thresholds, once set, stay for the process.
    out = subprocess.run([sys.executable, "-c", CHURN, mode], check=True, capture_output=True, text=True).stdout
    return int(out)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_a_refilled_window_reuses_its_memory_instead_of_faulting_it_in_again() -> None:
    default, tuned = _page_faults("default"), _page_faults("tuned")
    # 20 fills of ~12 MB: ~3,000 faults for the first, ~60,000 when every fill faults.
    assert tuned * 4 < default


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_it_applies_once_per_process() -> None:
    from sftp_plugin import allocator

    assert allocator.keep_freed_memory() is True
    allocator.keep_freed_memory()
    assert allocator.keep_freed_memory.cache_info().misses == 1
