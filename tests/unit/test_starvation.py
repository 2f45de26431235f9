"""Deadline: budgets that leave out time the host kept a process off a CPU.

Real scheduling: two busy processes pinned to one CPU share it, so each waits
about half the wall time; no clock or /proc is faked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pytest_virtio.qemu.starvation import Deadline, schedstat, thread_waits

BUSY = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"


def _busy_on_cpu0() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", BUSY])
    os.sched_setaffinity(proc.pid, {0})
    return proc


@pytest.fixture
def contended() -> Iterator[int]:
    """The pid of a busy process sharing CPU 0 with another busy process."""
    procs = [_busy_on_cpu0(), _busy_on_cpu0()]
    try:
        yield procs[0].pid
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_time_spent_waiting_for_a_cpu_is_not_charged(contended: int) -> None:
    """A busy process is always runnable: its wall time is its CPU time plus its
    wait, and the deadline expires only once the CPU time reaches the budget —
    later than a wall-clock deadline, by the wait (whatever else loads the host)."""
    ran_before = schedstat(contended)[0]
    deadline = Deadline(2.0, contended)
    while not deadline.expired() and deadline.elapsed() < 30:
        time.sleep(0.05)
    ran = (schedstat(contended)[0] - ran_before) / 1e9
    waited, elapsed = deadline.waited(), deadline.elapsed()
    assert deadline.expired()
    assert waited > 1.2, waited  # it shares CPU 0 with another busy process: ~half
    assert elapsed > 2.0 + 1.0  # a wall-clock deadline would have ended at 2.0 s
    assert abs(elapsed - (ran + waited)) < 0.3, (elapsed, ran, waited)
    assert "QEMU waited" in deadline.describe()


def test_credit_is_capped(contended: int) -> None:
    deadline = Deadline(0.2, contended, max_credit=1.0)
    time.sleep(1.0)
    assert deadline.waited() <= 0.2 + 1e-9
    assert deadline.expired()


def test_a_sleeping_process_gets_no_credit() -> None:
    """A guest idling on a device that never answers waits on nothing: a hang is
    still caught at the budget."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        deadline = Deadline(0.5, proc.pid)
        time.sleep(0.7)
        assert deadline.waited() < 0.05 and deadline.expired()
        assert deadline.describe() == ""
    finally:
        proc.kill()
        proc.wait()


def test_readers_of_a_gone_process_are_empty() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert thread_waits(proc.pid) == {} and schedstat(proc.pid) == (0, 0)
    assert not Deadline(1.0, None).expired() and Deadline(1.0, None).waited() == 0.0
