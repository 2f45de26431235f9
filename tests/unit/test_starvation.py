"""Deadline: budgets that leave out time the host kept a process off a CPU.

Real scheduling: two busy processes pinned to one CPU share it, so each waits
about half the wall time; two busy threads under a CPU hog per core are checked
against what they saw from inside; no clock or /proc is faked.  The arithmetic
for several threads is also checked on synthetic counts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_virtio.starvation import Deadline, WaitCredit, denied, schedstat, thread_waits

CC = shutil.which("cc") or shutil.which("gcc")

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


# -- several threads: the wall time during which one that wanted a CPU had none --

S = 1_000_000_000  # ns per second


def test_waits_at_different_times_add_up() -> None:
    """vCPU 0 starved in the first second, vCPU 1 in the next: the guest lost
    both seconds (the longest single wait, 1 s, was all the first version credited)."""
    credit = WaitCredit(0.0, {1: (0, 0, 0), 2: (0, 0, 1)}, cpus=2)
    assert credit.update(1.0, {1: (0, S, 0), 2: (S, 0, 1)}) == pytest.approx(1.0)
    assert credit.update(2.0, {1: (S, S, 0), 2: (S, S, 1)}) == pytest.approx(2.0)


def test_threads_on_one_cpu_add_up_on_two_overlap_independently() -> None:
    """Each thread waited 2/3 of the second.  Queued on one CPU they never ran
    together, so one of them always waited; on two CPUs (a hog on each) both
    ran at once (1/3)^2 of the time."""
    before = {1: (0, 0, 0), 2: (0, 0, 0)}
    after = {1: (S // 3, 2 * S // 3, 0), 2: (S // 3, 2 * S // 3, 0)}
    assert denied(1.0, before, after, cpus=2) == pytest.approx(1.0)
    apart = [{1: 0, 2: 1}]
    assert denied(1.0, before, after, cpus=2, placements=apart) == pytest.approx(8 / 9)
    # Found together in one sample of two, apart in the other: between the two.
    half = [{1: 0, 2: 0}, {1: 0, 2: 1}]
    assert denied(1.0, before, after, cpus=2, placements=half) == pytest.approx(17 / 18)


def test_waits_in_one_span_never_exceed_it() -> None:
    """Both threads waited the whole second: one second lost, not two."""
    idle = {1: (0, 0, 0), 2: (0, 0, 1)}
    assert denied(1.0, idle, {1: (0, S, 0), 2: (0, S, 1)}, cpus=2) == pytest.approx(1.0)


def test_threads_beyond_the_hosts_cpus_are_not_the_hosts_doing() -> None:
    """Four busy vCPUs on two CPUs and nobody else: each waits half the time, and
    nothing is credited; with another process taking one CPU, its second is."""
    idle_host = {tid: (S // 2, S // 2, tid % 2) for tid in range(4)}
    assert denied(1.0, {}, idle_host, cpus=2) == 0.0
    one_cpu_taken = {tid: (S // 4, 3 * S // 4, tid % 2) for tid in range(4)}
    assert denied(1.0, {}, one_cpu_taken, cpus=2) == pytest.approx(1.0)


def test_thread_churn() -> None:
    """A thread started within the span counts from zero; a gone one counts nothing."""
    before = {1: (0, 0, 0), 9: (5 * S, 5 * S, 1)}
    after = {1: (S // 2, 0, 0), 2: (0, S // 4, 0)}
    assert denied(1.0, before, after, cpus=2) == pytest.approx(0.25)


def test_a_wait_reported_late_is_not_clipped() -> None:
    """The kernel adds a wait when it ends: 0.3 s of it first seen 0.2 s after the
    previous sample is still 0.3 s once a whole span is judged."""
    credit = WaitCredit(0.0, {1: (0, 0, 0)}, cpus=2)
    assert credit.update(0.8, {1: (S // 2, 0, 0)}) == 0.0
    assert credit.update(1.0, {1: (S // 2, 3 * S // 10, 0)}) == pytest.approx(0.3)


BUSY_THREADS_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Two threads that never sleep.  Each notes when it was off a CPU: a step of
   its clock loop longer than 20 us.  At the end: "gap START END" (CLOCK_MONOTONIC). */
static double seconds;
struct gaps { double *at; long n, cap; };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *spin(void *arg) {
    struct gaps *g = arg;
    printf("tid %ld\n", (long)syscall(SYS_gettid));
    fflush(stdout);
    double prev = now(), end = prev + seconds;
    while (prev < end) {
        double t = now();
        if (t - prev > 20e-6) {
            if (g->n + 2 > g->cap) {
                g->cap = g->cap ? 2 * g->cap : 4096;
                g->at = realloc(g->at, g->cap * sizeof(double));
            }
            g->at[g->n++] = prev;
            g->at[g->n++] = t;
        }
        prev = t;
    }
    return NULL;
}

int main(int argc, char **argv) {
    pthread_t threads[2];
    struct gaps g[2] = {{0}};
    seconds = atof(argv[1]);
    for (int i = 0; i < 2; i++) pthread_create(&threads[i], NULL, spin, &g[i]);
    for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
    for (int i = 0; i < 2; i++)
        for (long j = 0; j < g[i].n; j += 2) printf("gap %.9f %.9f\n", g[i].at[j], g[i].at[j + 1]);
    return 0;
}
"""


@pytest.fixture(scope="module")
def busy_threads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A program with two busy threads that log when they were off a CPU."""
    folder = tmp_path_factory.mktemp("busy")
    (folder / "busy.c").write_text(BUSY_THREADS_C)
    subprocess.run([CC or "cc", "-O2", "-pthread", "-o", str(folder / "busy"),
                    str(folder / "busy.c")], check=True)
    return folder / "busy"


@contextlib.contextmanager
def _hogs(cpus: tuple[set[int] | None, ...]) -> Iterator[None]:
    """A CPU hog per entry (``timeout 60 sh -c 'while :; do :; done'``, on those
    CPUs if given), killed by process group at the end."""
    def pinned(pin: set[int] | None) -> Callable[[], None] | None:
        return None if pin is None else lambda: os.sched_setaffinity(0, pin)

    procs = [subprocess.Popen(["timeout", "60", "sh", "-c", "while :; do :; done"],
                              start_new_session=True, preexec_fn=pinned(pin))
             for pin in cpus]
    try:
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


#: Where the two busy threads and the two hogs run: the scheduler's choice; one
#: thread and one hog per CPU (the threads' waits overlap as independent ones);
#: both threads on CPU 0 with a hog, a hog on CPU 1 (one thread always waits).
PLACES: dict[str, tuple[tuple[set[int] | None, ...], tuple[set[int] | None, ...]]] = {
    "free": ((None, None), (None, None)),
    "apart": (({0}, {1}), ({0}, {1})),
    "together": (({0}, {0}), ({0}, {1})),
}


def _union(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] covered by any of the intervals."""
    total, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


@pytest.mark.skipif(CC is None, reason="needs a C compiler (cc) for two GIL-free busy threads")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("where", list(PLACES))
def test_credit_of_two_busy_threads_under_hogs_is_the_time_either_waited(
    busy_threads: Path, where: str
) -> None:
    """The truth, from inside: the wall time during which at least one of the two
    threads was off a CPU (the union of their gaps).  The deadline sees only the
    kernel's per-thread counts and CPUs, polled as a console wait polls them; its
    credit must be that union, not the longest single wait (measured 8-25 % of
    the wall time short: the threads were denied at different times)."""
    threads, hogs = PLACES[where]
    with _hogs(hogs):
        proc = subprocess.Popen([str(busy_threads), "8"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        tids = [int(proc.stdout.readline().split()[1]) for _ in range(2)]
        for tid, pin in zip(tids, threads, strict=True):
            if pin is not None:
                os.sched_setaffinity(tid, pin)
        time.sleep(0.3)
        deadline = Deadline(100.0, proc.pid, max_credit=1.0)
        waits_before = thread_waits(proc.pid)
        while deadline.elapsed() < 5.0:
            time.sleep(0.2)
            credit, end = deadline.waited(), time.monotonic()
        longest = max((thread_waits(proc.pid)[t] - waits_before[t]) / 1e9 for t in tids)
        out, _ = proc.communicate(timeout=30)
    gaps = [(float(a), float(b)) for _, a, b in (line.split() for line in out.splitlines())]
    truth, wall = _union(gaps, deadline.start, end), end - deadline.start
    report = (f"{where}: wall {wall:.2f}s: credited {credit:.2f}s, the threads were off "
              f"a CPU {truth:.2f}s, the longest single wait {longest:.2f}s")
    print(report)
    assert truth > 0.3 * wall, report  # the hogs took CPU from the threads
    assert abs(credit - truth) < 0.1 * wall, report
