"""This process's peak resident memory, per stage.

Linux keeps a high-water mark of a process's resident set (VmHWM in /proc/self/status); writing
"5" to /proc/self/clear_refs resets it to the current RSS, so the mark read at a stage's end is
the stage's own peak. Where the reset is not allowed (or not Linux), the mark is the process's
peak since it started (`getrusage`), which is never lower than the stage's.

With `cluster=ray` the stages run in worker processes: the driver's peak then leaves them out.

Between stages the loop hands memory that the last stage freed back to the kernel
(`release_freed_memory`): glibc keeps freed heap pages in its arenas, and a stage that follows
one with other tensor shapes and dtypes (bf16 search, then float32 training) otherwise stacks
its peak on the last stage's leftovers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
from functools import cache
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_HIGH_WATER_MARK = "5"  # proc(5): "reset the peak resident set size"


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current RSS; False where the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text(RESET_HIGH_WATER_MARK)
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """The high-water mark since the last reset (else since the process started), in MiB."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Collect garbage, then return the allocator's free pages to the kernel (glibc's
    malloc_trim(0)); False where the C library has no malloc_trim (musl, macOS)."""
    gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)  # 1 if it released pages, 0 if there were none
    return True
