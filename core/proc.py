"""Is the process that wrote this still running? One answer for run folders and the job store.

A pid alone is not enough: after a kill -9 or a reboot the number can belong to another
process. So every recorded pid comes with the start time of its process, and a process
counts as the same one only when both match. Zombies (exited, not yet reaped) are dead.
"""
from __future__ import annotations

import contextlib
import os

import psutil

# Start times come from /proc in clock ticks (1/100 s); a second of slack covers rounding.
SAME_START_TOLERANCE_S = 1.0


def started_at(pid: int | None) -> float | None:
    """When process `pid` started (seconds since the epoch), None if there is no such process."""
    if not pid:
        return None
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, OverflowError):
        return None


def is_alive(pid: int | None, started: float | None = None) -> bool:
    """Whether `pid` is a live, non-zombie process and, when `started` is known, the same
    process that started then. A zombie child of ours is reaped on the way."""
    if not pid:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
            return False
        actual = process.create_time()
    except psutil.AccessDenied:
        return True  # exists, owned by someone else: cannot be told apart further
    except (psutil.NoSuchProcess, ValueError, OverflowError):
        return False
    return started is None or abs(actual - float(started)) < SAME_START_TOLERANCE_S
