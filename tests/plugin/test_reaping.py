"""No QEMU, backend or socket survives: signals to pytest or a worker, raising fixtures.

Each case starts an inner pytest in its own process (private TMPDIR, so its
QEMUs are found by their run directory), waits until the inner test has a
booted guest and is sitting in ``sleep``, delivers the signal, then asserts
that the QEMU is gone within seconds and that no run directory (the sockets
live there) is left — or, after SIGKILL, that the stale-run sweep removes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_virtio.guests.session import RUN_PREFIX, sweep_stale_runs

TCG = "--virtio-accel=tcg"
#: Generous: under -n 2 the inner boot competes with the outer suite for CPUs.
BOOTED_WITHIN = 120.0
REAPED_WITHIN = 10.0
#: xdist waits 10 s (EXIT_TIMEOUT) for workers before killing them.
WORKER_TOLD_WITHIN = 7.0
#: Plugins the inner run does without.  hypothesis (a test tool of this repo,
#: not of the product) imports itself, assertion-rewritten, in its terminal
#: summary: measured >7 s of CPU in a worker on a loaded host (faulthandler
#: stack of the worker still alive after its QEMU was gone), which this file
#: then timed as if it were pytest-virtio's teardown.
QUIET_PLUGINS = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")
#: The inner pytest, with SIGINT live as in a terminal.  A run started in the
#: background of a non-interactive shell (``cmd &`` in a CI script) inherits
#: SIGINT ignored, exec keeps it so and Python leaves it alone: the SIGINT cases
#: then failed ("did not end within 60s") for the harness, not the plugin.
LIVE_SIGINT = ("import signal, sys, pytest; "
               "signal.signal(signal.SIGINT, signal.default_int_handler); "
               "sys.exit(pytest.console_main())")

HOLD = """
import os, time

def test_hold(guest):
    guest.check("true")
    with open(@MARKER@ + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {guest.machine.pid}")
    os.rename(@MARKER@ + ".tmp", @MARKER@)
    time.sleep(600)
"""

SWEEP_AFTER = """

def test_after(virtio_session):
    # A new session's first run root sweeps the dead worker's directory.
    assert virtio_session.run_root.is_dir()
"""

#: Tests still queued on the worker: without being told, it would start them.
MORE_QUEUED = """

import pytest

@pytest.mark.parametrize("i", range(3))
def test_more(guest, i):
    pass
"""


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _until(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def _run_dirs(tmp: Path) -> list[Path]:
    return [p for p in tmp.iterdir() if p.name.startswith(RUN_PREFIX)]


class Inner:
    """An inner pytest started with Popen so the test can signal it."""

    def __init__(self, path: Path, args: list[str]) -> None:
        self.marker = path / "booted"
        self.log = path / "inner.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LIVE_SIGINT, *QUIET_PLUGINS, TCG, *args],
                cwd=path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_booted(self) -> tuple[int, int]:
        """(pid of the process running the test, QEMU pid) once the guest answers."""
        ok = _until(lambda: self.marker.exists() or self.proc.poll() is not None,
                    BOOTED_WITHIN)
        assert ok and self.marker.exists(), f"inner guest never booted:\n{self.output()}"
        test_pid, qemu_pid = map(int, self.marker.read_text().split())
        return test_pid, qemu_pid

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"inner pytest did not end within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def inner(pytester: pytest.Pytester, inner_tmp: Path) -> Iterator[Callable[..., Inner]]:
    """Start an inner run of ``HOLD`` (+ extra tests); always killed at the end."""
    started: list[Inner] = []

    def start(*args: str, extra: str = "") -> Inner:
        source = HOLD.replace("@MARKER@", repr(str(pytester.path / "booted"))) + extra
        pytester.makepyfile(test_inner=source)
        started.append(Inner(pytester.path, list(args)))
        return started[-1]

    yield start
    for run in started:
        run.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=lambda s: signal.Signals(s).name)
def test_signal_to_pytest_reaps_qemu_and_run_dir(
    inner: Callable[..., Inner], inner_tmp: Path, find_qemus, sig: int
) -> None:
    run = inner("-q")
    test_pid, qemu_pid = run.wait_booted()
    assert test_pid == run.proc.pid
    assert find_qemus(inner_tmp), "the inner guest's QEMU is not visible"
    os.kill(run.proc.pid, sig)
    rc = run.wait()
    assert _until(lambda: _pid_gone(qemu_pid) and not find_qemus(inner_tmp), REAPED_WITHIN), \
        find_qemus(inner_tmp)
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
        stale = _run_dirs(inner_tmp)  # nobody could clean up: the next session sweeps
        assert len(stale) == 1
        assert sweep_stale_runs(inner_tmp) == stale
    else:
        assert rc == pytest.ExitCode.INTERRUPTED, run.output()
        assert "KeyboardInterrupt" in run.output()
    assert _run_dirs(inner_tmp) == []


def test_sigkilled_xdist_worker_takes_its_qemu_and_is_swept(
    inner: Callable[..., Inner], inner_tmp: Path, find_qemus
) -> None:
    run = inner("-n", "1", "-p", "xdist", extra=SWEEP_AFTER)
    worker_pid, qemu_pid = run.wait_booted()
    assert worker_pid != run.proc.pid
    os.kill(worker_pid, signal.SIGKILL)
    assert _until(lambda: _pid_gone(qemu_pid), REAPED_WITHIN), "QEMU outlived its worker"
    run.wait()
    out = run.output()
    assert "crashed" in out, out
    assert "1 passed" in out, out  # the replacement worker ran test_after
    assert find_qemus(inner_tmp) == []
    assert _run_dirs(inner_tmp) == []  # the dead worker's directory was swept


def test_sigkilled_xdist_controller_takes_worker_guests_along(
    inner: Callable[..., Inner], inner_tmp: Path, find_qemus
) -> None:
    run = inner("-n", "1", "-p", "xdist")
    worker_pid, qemu_pid = run.wait_booted()
    os.kill(run.proc.pid, signal.SIGKILL)
    run.wait()
    # The orphaned worker is told (PDEATHSIG → SIGTERM → KeyboardInterrupt) and
    # goes, taking its QEMU along.  Whether it also removed its run directory
    # depends on how far its teardown got before execnet noticed the dead
    # controller; whatever is left is the stale-run sweep's job.
    assert _until(lambda: _pid_gone(worker_pid) and _pid_gone(qemu_pid), REAPED_WITHIN)
    assert find_qemus(inner_tmp) == []
    sweep_stale_runs(inner_tmp)
    assert _run_dirs(inner_tmp) == []



@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM],
                         ids=lambda s: signal.Signals(s).name)
def test_signal_to_xdist_controller_alone_stops_workers_cleanly(
    inner: Callable[..., Inner], inner_tmp: Path, find_qemus, sig: int
) -> None:
    """``kill PID`` of the controller (not its process group, as most CI runners do):
    the workers are told at once and tear down, instead of running on until
    xdist kills them ten seconds later and leaves their sockets behind."""
    run = inner("-n", "1", "-p", "xdist", extra=MORE_QUEUED)
    worker_pid, qemu_pid = run.wait_booted()
    assert worker_pid != run.proc.pid
    os.kill(run.proc.pid, sig)
    # Before xdist's own 10 s shutdown timeout would have ended the worker.
    assert _until(lambda: _pid_gone(worker_pid), WORKER_TOLD_WITHIN), \
        "the worker ran on after its controller was interrupted"
    rc = run.wait()
    assert rc == pytest.ExitCode.INTERRUPTED, run.output()
    assert _until(lambda: _pid_gone(qemu_pid), REAPED_WITHIN)
    assert find_qemus(inner_tmp) == []
    assert _run_dirs(inner_tmp) == []  # the worker removed its own, no sweep needed

def test_fixture_raising_half_way_leaves_nothing(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def half(make_guest):
            g = make_guest(name="half")
            g.check("true")
            raise RuntimeError("fixture broke half-way")

        def test_x(half):
            pass
        """
    )
    result = pytester.runpytest_subprocess(TCG)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*RuntimeError: fixture broke half-way*"])
    assert find_qemus(inner_tmp) == []
    assert _run_dirs(inner_tmp) == []


def test_backend_that_will_not_stop_is_a_teardown_error_naming_its_disk(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus
) -> None:
    """A vhost-user backend stuck in a request (here: 60 s of injected latency)
    outlives stop()'s 10 s: teardown used to swallow that BackendError and
    report a pass, leaving the thread and its selector, listener and wake fd."""
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.vm(disks=[{"name": "slow", "bus": "vhost-user-blk", "size": "16M"}])
        def test_x(guest, vhost):
            server = vhost["slow"]
            dev = guest.disk_path("slow")
            server.faults.add_latency(60)  # every request from now on
            kicks = sum(server.stats.kicks)
            guest.check(f"dd if=/dev/zero of={dev} bs=4k count=1 oflag=direct "
                        ">/dev/null 2>&1 &")
            deadline = time.monotonic() + 60
            while sum(server.stats.kicks) == kicks:  # the write is in the backend
                assert time.monotonic() < deadline, "the write never reached the backend"
                time.sleep(0.05)
        """
    )
    result = pytester.runpytest_subprocess(TCG)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_x*",
        "*BackendError: guest 'guest': vhost-user-blk disk 'slow' did not stop: "
        "vhost-user thread serving * did not stop within 10.0s; it is in *",
    ])
    assert find_qemus(inner_tmp) == []
    assert _run_dirs(inner_tmp) == []


def test_sweep_removes_only_dead_sessions(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone, live, foreign = (tmp_path / f"{RUN_PREFIX}{n}" for n in ("dead", "live", "nopid"))
    for d in (gone, live, foreign):
        d.mkdir()
    (gone / "owner.pid").write_text(str(dead.pid))
    (live / "owner.pid").write_text(str(os.getpid()))
    (gone / "qmp.sock").write_text("")
    assert sweep_stale_runs(tmp_path) == [gone]
    assert not gone.exists() and live.is_dir() and foreign.is_dir()
