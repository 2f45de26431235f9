"""How much of a wait the host took from QEMU: schedstat run-queue time, and a
deadline that does not charge the guest for it.

Why: under TCG the guest advances only while QEMU's vCPU thread is on a CPU.  On
a loaded CI runner (load 20 on 2 cores was seen) a boot that needs 5 s of CPU
can take a minute of wall time, and a wall-clock budget then fails a healthy
guest ("did not answer within 60s while booting").  The kernel counts, per
thread, the time it was runnable but waiting for a CPU (``/proc/PID/task/TID/
schedstat``, field 2); a :class:`Deadline` adds that time back to its budget.

A hang is still caught at the normal budget: a guest spinning in a loop runs
(no wait accrues), and a guest idling on a device that never answers sleeps
(no wait accrues either).  Only time QEMU wanted a CPU and was refused is not
counted, and never more than ``max_credit`` times the budget.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

__all__ = ["Deadline", "schedstat", "thread_waits"]


def _tasks(pid: int) -> dict[int, tuple[int, int]]:
    """Per thread of ``pid``: (ns on a CPU, ns runnable but waiting for one),
    fields 1 and 2 of ``/proc/PID/task/TID/schedstat``; empty once it is gone."""
    stats: dict[int, tuple[int, int]] = {}
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = task.read_text().split()
            stats[int(task.parent.name)] = (int(fields[0]), int(fields[1]))
    return stats


def thread_waits(pid: int) -> dict[int, int]:
    """Nanoseconds each thread of ``pid`` has spent runnable but not running."""
    return {tid: waited for tid, (_, waited) in _tasks(pid).items()}


def schedstat(pid: int) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one), summed over the process's threads."""
    tasks = _tasks(pid).values()
    return sum(ran for ran, _ in tasks), sum(waited for _, waited in tasks)


class Deadline:
    """``budget`` seconds of wall time, not counting time QEMU waited for a CPU.

    The wait counted is the largest of any one thread's since the deadline was
    set (the threads wait at the same time, so a sum would count one lost
    second once per thread); for a TCG guest that is its vCPU thread.
    ``pid=None`` makes it a plain wall-clock deadline.
    """

    def __init__(self, budget: float, pid: int | None, max_credit: float = 9.0) -> None:
        self.budget = budget
        self.pid = pid
        self.max_credit = max_credit
        self.start = time.monotonic()
        self._base = thread_waits(pid) if pid is not None else {}

    def waited(self) -> float:
        """Seconds QEMU has waited for a CPU since the deadline was set (capped)."""
        if self.pid is None:
            return 0.0
        now = thread_waits(self.pid)
        lost = max((ns - self._base.get(tid, 0) for tid, ns in now.items()), default=0)
        return min(lost / 1e9, self.max_credit * self.budget)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        """Budget left: wall time so far, minus the time the host denied QEMU."""
        return self.budget - (self.elapsed() - self.waited())

    def expired(self) -> bool:
        return self.remaining() <= 0

    def describe(self) -> str:
        """How the budget went, for a timeout message."""
        waited = self.waited()
        if waited < 1.0:
            return ""
        return (f" ({self.elapsed():.0f}s wall, of which QEMU waited {waited:.0f}s for a "
                "CPU the host gave to others: that time was not counted)")
