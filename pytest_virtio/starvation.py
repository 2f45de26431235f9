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

Several threads (MTTCG runs one per vCPU, besides the main loop and I/O
workers): the time not counted is the wall time during which a thread that
wanted a CPU had none.  A guest whose vCPU is off a CPU soon stalls on it (IPIs,
locks, RCU), so the guest lost that time.  The kernel counts each thread's
wait, not when the waits fell, so over a span that union lies between the
longest single wait (all the first version credited: a guest failed to boot at
171 s wall credited with 111 s) and the sum of the waits.  Where it lies
depends on where the threads were queued, which ``/proc/PID/task/TID/stat``
tells (field 39, the CPU): two threads queued on one CPU never run together, so
their waits fall at different times and add up; threads on different CPUs wait
for different competitors, independently.  The deadline notes each thread's CPU
whenever it samples and averages the two cases over a span as the threads were
found.  Measured with two busy threads against what they saw from inside
(tests/unit/test_starvation.py and its hogs): within 5 % of the wall time
whether they shared a CPU or not, where the sum alone was 10 % over when they
ran apart, independence alone 6-24 % under when they shared, and the longest
wait 20-47 % under.  Waits that the process's own threads beyond the host's CPUs
explain are not the host's doing and are not credited (four busy vCPUs on two
CPUs wait half the time on an idle host).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Deadline", "WaitCredit", "denied", "schedstat", "thread_waits"]

#: One thread as sampled: (ns on a CPU, ns runnable but waiting for one, the CPU
#: it runs or is queued on).
Counts = tuple[int, int, int]

#: Waits are judged over spans of at least this many seconds: the kernel adds a
#: wait to a thread's count when the wait ends, so a shorter span could be handed
#: a wait longer than itself (and clip it).
SPAN = 1.0

#: A deadline samples its process at most this often (the console asks it on
#: every read); in between it answers with its last figure.
SAMPLE_EVERY = 0.05


def _thread(task: Path) -> Counts:
    run_ns, wait_ns = task.joinpath("schedstat").read_text().split()[:2]
    # stat: "TID (comm) S ..." with field 39 the CPU; comm may hold spaces or ')'.
    cpu = task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[36]
    return int(run_ns), int(wait_ns), int(cpu)


def _tasks(pid: int) -> dict[int, Counts]:
    """Every thread of ``pid`` as sampled now (see :data:`Counts`); empty once it is gone."""
    stats: dict[int, Counts] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stats[int(task.name)] = _thread(task)
    return stats


def thread_waits(pid: int) -> dict[int, int]:
    """Nanoseconds each thread of ``pid`` has spent runnable but not running."""
    return {tid: counts[1] for tid, counts in _tasks(pid).items()}


def schedstat(pid: int) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one), summed over the process's threads."""
    tasks = _tasks(pid).values()
    return sum(c[0] for c in tasks), sum(c[1] for c in tasks)


def _cpus(pid: int) -> int:
    """How many CPUs the host lets ``pid`` run on."""
    try:
        return len(os.sched_getaffinity(pid))
    except OSError:
        return os.cpu_count() or 1


def _union(span: float, waits: dict[int, float], placement: dict[int, int]) -> float:
    """Seconds of ``span`` during which one of the threads waited, if they were
    queued as ``placement`` says: waits on one CPU add up (up to the span),
    those on different CPUs overlap as independent ones do."""
    per_cpu: dict[int, float] = {}
    for tid, waited in waits.items():
        cpu = placement.get(tid, -1 - tid)  # not seen: a CPU of its own
        per_cpu[cpu] = per_cpu.get(cpu, 0.0) + waited
    none_waiting = 1.0
    for waited in per_cpu.values():
        none_waiting *= 1.0 - min(1.0, waited / span)
    return span * (1.0 - none_waiting)


def denied(span: float, before: dict[int, Counts], after: dict[int, Counts], cpus: int,
           placements: Sequence[dict[int, int]] = ()) -> float:
    """Seconds of ``span`` during which the host kept a thread that wanted a CPU off one.

    ``before``/``after``: the threads at the span's ends (one missing from
    ``before`` started within the span); ``placements``: where the threads were
    queued when sampled within the span (default: as in ``after``).  The wait
    the threads beyond ``cpus`` explain is left out.
    """
    if span <= 0:
        return 0.0
    waits: dict[int, float] = {}
    ran = 0.0
    for tid, (run_ns, wait_ns, _) in after.items():
        run0, wait0, _ = before.get(tid, (0, 0, 0))
        ran += max(0, run_ns - run0) / 1e9
        waits[tid] = max(0, wait_ns - wait0) / 1e9
    waited = sum(waits.values())
    own = max(0.0, (ran + waited) / span - cpus) * span  # more threads wanting than CPUs
    seen = placements or [{tid: c[2] for tid, c in after.items()}]
    union = sum(_union(span, waits, p) for p in seen) / len(seen)
    return max(0.0, min(union, waited - own))


class WaitCredit:
    """The time denied to a process so far, from samples of its threads.

    Spans of at least :data:`SPAN` seconds are judged by :func:`denied` with the
    placements sampled within them, and added up; the span since the last of
    them is judged as it stands.
    """

    def __init__(self, at: float, sample: dict[int, Counts], cpus: int) -> None:
        self.cpus = cpus
        self._mark = (at, sample)
        self._placements: list[dict[int, int]] = []
        self._total = 0.0

    def update(self, at: float, sample: dict[int, Counts]) -> float:
        """Seconds denied from the first sample to this one (taken at ``at``)."""
        start, before = self._mark
        self._placements.append({tid: c[2] for tid, c in sample.items()})
        recent = denied(at - start, before, sample, self.cpus, self._placements)
        if at - start < SPAN:
            return self._total + recent
        self._total += recent
        self._mark = (at, sample)
        self._placements = []
        return self._total


class Deadline:
    """``budget`` seconds of wall time, not counting time QEMU was denied a CPU.

    The time not counted is what :class:`WaitCredit` makes of the waits of all
    of QEMU's threads since the deadline was set (see the module's docstring),
    at most ``max_credit`` times the budget.  ``pid=None`` makes it a plain
    wall-clock deadline.
    """

    def __init__(self, budget: float, pid: int | None, max_credit: float = 9.0) -> None:
        self.budget = budget
        self.pid = pid
        self.max_credit = max_credit
        self.start = time.monotonic()
        self._credit = (WaitCredit(self.start, _tasks(pid), _cpus(pid))
                        if pid is not None else None)
        self._last = (self.start, 0.0)

    def waited(self) -> float:
        """Seconds QEMU has been denied a CPU since the deadline was set (capped)."""
        if self.pid is None or self._credit is None:
            return 0.0
        now, lost = time.monotonic(), self._last[1]
        if now - self._last[0] >= SAMPLE_EVERY:
            lost = self._credit.update(now, _tasks(self.pid))
            self._last = (now, lost)
        return min(lost, self.max_credit * self.budget)

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
