"""Helper processes that die with pytest, as QEMU does.

Every long-lived program the plugin starts (the host's iperf3 server, the image
builder's mmdebstrap and all it forks, QEMU) must not outlive pytest, even a
pytest killed by SIGKILL, which runs no teardown.  :func:`start` launches one so:

- ``setpriv --pdeathsig KILL --`` (util-linux) sets ``PR_SET_PDEATHSIG(SIGKILL)``
  between fork and exec, then execs the program (its PID is the helper's): no
  Python runs in the forked child, where locks other threads hold would stay
  taken forever.
- The kernel sends that signal when the *thread* that forked the child exits,
  not the process (prctl(2)): the fork happens on the main thread, or on one
  daemon thread that lives as long as the process (:func:`spawn`).
- Its own process group: Ctrl-C in a terminal reaches pytest alone, which then
  stops the helper in order (teardown) instead of the helper dying mid-work.
- ``contain=True`` adds ``unshare --fork --pid --mount --kill-child --``: the
  program runs as PID 1 of new PID and mount namespaces.  A parent-death signal
  reaches one process, not the ones it forked (mmdebstrap → apt → dpkg →
  maintainer scripts); when PID 1 of a namespace dies the kernel kills every
  process in it, and the mounts made inside (the build's ``proc``, ``sys``,
  ``dev/pts``, ``dev/shm``) were never visible outside and vanish with it.
  Needs root (CAP_SYS_ADMIN), as the mounts themselves do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from pytest_virtio.interrupts import descendants
from pytest_virtio.tools import require_tool

__all__ = ["CONTAIN_EXEC", "DEATH_SIGNAL_EXEC", "helper_argv", "running", "spawn", "start", "stop",
           "wait_gone"]

log = logging.getLogger(__name__)

#: Sets PR_SET_PDEATHSIG(SIGKILL), then execs the rest of its argv.  util-linux is
#: Essential in Debian, so every host has it.
DEATH_SIGNAL_EXEC = ("setpriv", "--pdeathsig", "KILL", "--")
#: The rest of its argv as PID 1 of new PID and mount namespaces (propagation
#: private, util-linux's default); ``--kill-child`` kills that PID 1 when unshare
#: dies, and with it the whole namespace.
CONTAIN_EXEC = ("unshare", "--fork", "--pid", "--mount", "--kill-child", "--")

_Start = Callable[[], "subprocess.Popen[Any]"]


class _Spawner:
    """Forks helpers from a thread that lives as long as the process.

    A helper started from a short-lived thread (a test booting guests from a
    thread pool) would be killed as soon as that thread ended.  The main thread
    lives as long as the process, so it forks directly; any other thread hands
    the fork to one daemon thread that never exits.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the thread (in a forked child, which has none)."""
        self._jobs: queue.SimpleQueue[tuple[_Start, Future[subprocess.Popen[Any]]]] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, start: _Start) -> subprocess.Popen[Any]:
        """``start()`` (which forks) on a thread that outlives the child."""
        if threading.current_thread() is threading.main_thread():
            return start()
        future: Future[subprocess.Popen[Any]] = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, daemon=True,
                                                name="pytest-virtio-spawner")
                self._thread.start()
        self._jobs.put((start, future))
        return future.result()

    def _serve(self) -> None:
        while True:
            start, future = self._jobs.get()
            try:
                future.set_result(start())
            except BaseException as exc:  # handed to the caller's thread
                future.set_exception(exc)


_SPAWNER = _Spawner()
# A forked child (multiprocessing) has no spawner thread: it starts its own.
os.register_at_fork(after_in_child=_SPAWNER.reset)


def spawn(start: _Start) -> subprocess.Popen[Any]:
    """Run ``start()`` (a ``subprocess.Popen(...)`` of a :func:`helper_argv`) on a
    thread that lives as long as this process, so the death signal holds."""
    return _SPAWNER.run(start)


def helper_argv(argv: Sequence[str], *, contain: bool = False) -> list[str]:
    """``setpriv --pdeathsig KILL -- [unshare ... --] argv``; a missing util-linux
    tool raises MissingToolError naming the package.  ``argv[0]`` is the caller's
    to check (its own message names its own package)."""
    why = "it makes helper processes die with pytest"
    prefix = [require_tool(DEATH_SIGNAL_EXEC[0], "util-linux", why), *DEATH_SIGNAL_EXEC[1:]]
    if contain:
        prefix += [require_tool(CONTAIN_EXEC[0], "util-linux", why), *CONTAIN_EXEC[1:]]
    return [*prefix, *argv]


def start(argv: Sequence[str], *, contain: bool = False, **popen: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` so that it dies with this process, even by SIGKILL.

    Own process group, death signal, forked from a long-lived thread; with
    ``contain``, every process it forks dies with it too and its mounts are
    private (see the module doc).  ``popen`` goes to ``subprocess.Popen``
    (stdout, text, pass_fds, ...).  Stop it with :func:`stop`.
    """
    full = helper_argv(argv, contain=contain)
    log.debug("starting helper%s: %s", " (contained)" if contain else "", " ".join(full))
    return spawn(lambda: subprocess.Popen(full, process_group=0, **popen))


def stop(proc: subprocess.Popen[Any], grace: float = 2.0, reap: float = 10.0) -> int:
    """SIGTERM to the helper's process group, SIGKILL after ``grace`` s; its exit status.

    ``grace=0`` kills at once.  Returns once the helper is reaped and every
    process it had started has exited (for a contained helper: its namespace
    is empty, so its mounts are gone), waiting at most ``reap`` s for them.
    """
    started = descendants(proc.pid) if proc.poll() is None else []
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, reap)):
        if proc.poll() is not None:
            break
        if sig == signal.SIGTERM and grace <= 0:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
    rc = proc.wait()
    if left := wait_gone(started, reap):
        log.warning("processes %s still running %.0fs after their helper %d was stopped",
                    left, reap, proc.pid)
    return rc


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for every pid to exit; those still running."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def running(pid: int, proc: Path = Path("/proc")) -> bool:
    """Is ``pid`` a live process (not gone, not a zombie nobody reaped yet)?"""
    try:
        state = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
