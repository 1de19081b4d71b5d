"""This process's peak resident memory, per stage.

Linux keeps a high-water mark of a process's resident set (VmHWM in /proc/self/status); writing
"5" to /proc/self/clear_refs resets it to the current RSS, so the mark read at a stage's end is
the stage's own peak. Where the reset is not allowed (or not Linux), the mark is the process's
peak since it started (`getrusage`), which is never lower than the stage's.

With `cluster=ray` the stages run in worker processes: the driver's peak then leaves them out.
"""

from __future__ import annotations

import resource
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
