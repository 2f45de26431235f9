"""One QEMU process: launch, QMP, console, soft→hard shutdown, reaping.

Why these choices:
- QEMU starts paused (``-S``) so the console and QMP are connected before the
  first instruction runs: no boot output can be missed.
- Its own process group plus ``PR_SET_PDEATHSIG(SIGKILL)``: if pytest (or an
  xdist worker) dies by any signal, even SIGKILL, the kernel kills QEMU too.
  Every live machine is also in a registry swept at interpreter exit.
  No Python runs between fork and exec (backend threads hold locks a forked
  child would inherit taken): ``subprocess`` makes the process group itself and
  util-linux's ``setpriv --pdeathsig`` sets the death signal, then execs QEMU.
- QMP through qemu.qmp's synchronous ``QEMUMonitorProtocol``: the project
  does not write its own QMP client.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from pytest_virtio import procs
from pytest_virtio.channels.console import PANIC_RE, Console, both_tails, tail_of
from pytest_virtio.errors import GuestPanic, LaunchError, MissingToolError, QmpError, QmpTimeout
from pytest_virtio.spec.context import command_channel

log = logging.getLogger(__name__)


class RunState(enum.Enum):
    """Explicit lifecycle, as qemu.qmp does for its connections."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"


#: QEMU stderr → a one-line cause naming the fix (first match wins).
_STDERR_HINTS: tuple[tuple[str, str], ...] = (
    (r'Failed to get "\w+" lock[\s\S]*?Is another process using the image \[([^\]]+)\]',
     "disk image {0} is in use by another QEMU (image lock held): give each guest its "
     "own copy of the file, or attach it with readonly=True in every guest"),
    (r"Could not open '([^']+)': Permission denied",
     "QEMU cannot open {0}: permission denied; make it readable (and writable unless "
     "readonly=True) by this user"),
    (r"Could not open '([^']+)': No such file or directory",
     "QEMU cannot open {0}: no such file; check the path given to the test"),
    (r"cannot set up guest memory '[^']*': Cannot allocate memory",
     "QEMU could not allocate the guest's memory; ask for less (vm(memory=...)) or run "
     "fewer guests at once (-n)"),
)


def diagnose_stderr(path: Path) -> str | None:
    """Recognise QEMU's common start-up failures and say what to do in one line."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for pattern, message in _STDERR_HINTS:
        match = re.search(pattern, text)
        if match:
            return message.format(*match.groups())
    return None


def describe_exit(rc: int) -> str:
    """``QEMU exited with status 1`` / ``QEMU was killed by signal 9 (SIGKILL)``."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = "?"
        return f"QEMU was killed by signal {-rc} ({name}) (exit status {rc})"
    return f"QEMU exited with status {rc}"


def _refused(exc: BaseException | None) -> bool:
    """Is ConnectionRefusedError anywhere in ``exc``'s cause chain (qemu.qmp wraps it)?"""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConnectionRefusedError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


#: How long any QMP command waits for its reply.  Replies take milliseconds even on
#: a loaded host; none within a minute means QEMU's main loop is blocked, and an
#: unbounded wait would hang the test (and its teardown) for as long.
QMP_REPLY_TIMEOUT = 60.0

def _qemu_argv(argv: list[str]) -> list[str]:
    """QEMU's argv as :func:`procs.helper_argv` runs it (``setpriv --pdeathsig KILL``);
    a missing QEMU or util-linux names its package."""
    if shutil.which(argv[0]) is None:
        raise LaunchError(f"cannot run {argv[0]}: not found; "
                          "install it with: apt-get install qemu-system-x86")
    try:
        return procs.helper_argv(argv)
    except MissingToolError as exc:
        raise LaunchError(str(exc)) from None


def connect_qmp(path: str, timeout: float, exited: Callable[[], bool]) -> QEMUMonitorProtocol:
    """Connect to QEMU's QMP socket ``path`` and negotiate capabilities.

    The socket file appears at bind(), a moment before listen(): a connect in
    between is refused (seen once in 20 runs, and 4 times in one loaded run of
    the argv tests), so a refusal is retried until ``timeout`` while
    ``exited()`` is False.  Any other failure is raised as qemu.qmp raised it.
    """
    deadline = time.monotonic() + timeout
    while True:
        qmp = QEMUMonitorProtocol(path)
        try:
            qmp.connect(negotiate=True)
            return qmp
        except Exception as exc:
            with contextlib.suppress(Exception):
                qmp.close()
            if not (_refused(exc) and not exited() and time.monotonic() < deadline):
                raise
            time.sleep(0.02)


_LIVE: weakref.WeakSet[Machine] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def reap_all() -> int:
    """Kill every machine this process still has running; returns how many."""
    with _LIVE_LOCK:
        machines = list(_LIVE)
    for m in machines:
        m.kill()
    return len(machines)


#: Commands sent in polling loops: logged at DEBUG, or they would drown the trail.
_POLLED = frozenset({"query-migrate", "query-status", "query-block-jobs"})


def _brief(value: object, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


class Machine:
    """A QEMU process built from an argv the spec layer produced.

    ``qmp_socket``/``console_socket`` must be the paths the argv names.
    """

    def __init__(
        self,
        argv: list[str],
        run_dir: Path,
        *,
        qmp_socket: str,
        console_socket: str,
        console_log: Path,
        connect_timeout: float = 10.0,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.argv = list(argv)
        #: The guest's name, as ``-name`` gives it to QEMU: what the log trail says.
        self.name = argv[argv.index("-name") + 1] if "-name" in argv else run_dir.name
        #: Descriptors QEMU inherits (a restore's ``-incoming fd:N`` state file).
        self.pass_fds = pass_fds
        self.run_dir = run_dir
        self.qmp_socket = qmp_socket
        self.console_socket = console_socket
        self.console_log = console_log
        self.connect_timeout = connect_timeout
        self.stderr_path = run_dir / "qemu.stderr"
        self.state = RunState.CREATED
        self.events: list[dict[str, Any]] = []
        #: The text of ``reproduce.sh`` when the caller can make one that runs on its
        #: own (see :mod:`pytest_virtio.guests.reproduce`); else the bare command line.
        self.reproducer: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        #: Bound on every QMP reply (see :data:`QMP_REPLY_TIMEOUT`).
        self.qmp_timeout = QMP_REPLY_TIMEOUT
        self._console: Console | None = None
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------
    def launch(self, incoming_timeout: float | None = None) -> None:
        """Start QEMU paused, connect QMP and the console, then let it run.

        With ``incoming_timeout``, the argv has ``-incoming`` (a restore): QEMU
        loads the guest while we connect, and it runs once the load completed.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.write_reproducer()
        try:
            argv = _qemu_argv([*self.argv, "-S"])
        except LaunchError:
            self.state = RunState.FAILED
            raise
        with self.stderr_path.open("wb") as err:
            # QEMU dies with pytest like every helper (procs: death signal, own
            # process group, forked from a thread that lives as long as we do).
            self._proc = procs.spawn(lambda: subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                process_group=0, close_fds=True, pass_fds=self.pass_fds,
            ))
        with _LIVE_LOCK:
            _LIVE.add(self)
        log.info("launched QEMU for %s: pid %d (%s)", self.name, self._proc.pid,
                 "restoring" if incoming_timeout is not None else "booting")
        try:
            self._qmp = self._connect_qmp()
            self._console = Console.connect(
                self.console_socket, command_channel(self.console_socket)[0],
                self.console_log, self.check_alive, self.connect_timeout, self.pid,
            )
            if incoming_timeout is not None:
                self.wait_migration(incoming_timeout)
            self.qmp("cont")
        except BaseException:
            self.kill()
            raise
        self.state = RunState.RUNNING

    def _connect_qmp(self) -> QEMUMonitorProtocol:
        deadline = time.monotonic() + self.connect_timeout
        while not os.path.exists(self.qmp_socket):
            self.check_alive()
            if time.monotonic() > deadline:
                raise LaunchError(f"QEMU never created its QMP socket {self.qmp_socket}\n"
                                  f"{self.stderr_tail()}")
            time.sleep(0.01)
        try:
            return connect_qmp(self.qmp_socket, deadline - time.monotonic(),
                               lambda: self.exitcode() is not None)
        except Exception as exc:
            # QEMU listens before it opens its drives: a start-up failure (an
            # image lock, say) looks like EOF here.  Report QEMU's reason instead.
            self._wait_exit(2.0)
            self.check_alive()
            raise LaunchError(f"QMP handshake with QEMU failed: {exc}\n"
                              f"{self.stderr_tail()}") from exc

    def _wait_exit(self, timeout: float) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def console(self) -> Console:
        if self._console is None:
            raise LaunchError("machine is not running")
        return self._console

    def is_running(self) -> bool:
        """Launched, not shut down by us, and the process has not exited."""
        return self.state is RunState.RUNNING and self.exitcode() is None

    def exitcode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise if QEMU has exited: GuestPanic after GUEST_PANICKED, else LaunchError.

        pvpanic makes QEMU power off on a guest panic (exit status 0), so a
        panic the console did not show still fails as a panic, not a mystery exit.
        """
        rc = self.exitcode()
        if rc is not None and self.state is not RunState.STOPPED:
            self.state = RunState.FAILED
            with contextlib.suppress(Exception):
                self.poll_events()
            panic = self.panic_event()
            if panic is not None:
                raise GuestPanic(
                    f"guest kernel panicked (QMP GUEST_PANICKED, action "
                    f"{panic.get('data', {}).get('action', '?')}): {self.console_panic_line()}"
                    f"; QEMU exited with status {rc}",
                    both_tails(self.console_log),
                )
            hint = diagnose_stderr(self.stderr_path) or describe_exit(rc)
            raise LaunchError(
                f"{hint}\n--- qemu stderr ---\n"
                f"{self.stderr_tail()}\n--- command ---\n{self.command_line()}"
            )

    def panic_event(self) -> dict[str, Any] | None:
        """The GUEST_PANICKED event, if QEMU reported one."""
        return next((e for e in self.events if e.get("event") == "GUEST_PANICKED"), None)

    def console_panic_line(self) -> str:
        """The kernel's panic line from the console log, for the failure message."""
        match = re.search(PANIC_RE, tail_of(self.console_log, 400))
        return match.group(1) if match else "no panic line reached the console"

    # -- QMP -----------------------------------------------------------------
    def qmp(self, cmd: str, **args: Any) -> Any:
        """Run a QMP command; QEMU's error reply becomes a QmpError carrying it."""
        if self._qmp is None:
            raise LaunchError("QMP is not connected")
        quiet = cmd in _POLLED
        (log.debug if quiet else log.info)("QMP %s -> %s %s", self.name, cmd, args or "")
        with self._lock:
            try:
                self._qmp.settimeout(self.qmp_timeout)
                reply = self._qmp.cmd_raw(cmd, args or None)
            except TimeoutError as exc:  # qemu.qmp's wait_for; asyncio's is the same class
                log.warning("QMP %s: no reply to %s within %.0fs", self.name, cmd,
                            self.qmp_timeout)
                raise QmpTimeout(cmd, args or None, self.qmp_timeout,
                                 self.stderr_tail()) from exc
            events = self._qmp.get_events(wait=False)
            self.events.extend(events)
            self._qmp.clear_events()
        for event in events:
            log.info("QMP %s event %s %s", self.name, event.get("event"), event.get("data", ""))
        if "error" in reply:
            error = reply["error"]
            log.warning("QMP %s <- %s error: %s", self.name, cmd, error)
            raise QmpError(cmd, args or None, str(error.get("class", "?")),
                           str(error.get("desc", reply)))
        (log.debug if quiet else log.info)("QMP %s <- %s %s", self.name, cmd,
                                           _brief(reply.get("return")))
        return reply.get("return")

    def wait_migration(self, timeout: float) -> dict[str, Any]:
        """Poll ``query-migrate`` until the migration (out or in) completed.

        QEMU 7.2 has no synchronous save: ``migrate`` returns at once and the
        stream runs in QEMU's migration thread.  A failure raises with QEMU's
        own reason (e.g. a device that blocks migration).
        """
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            info = self.qmp("query-migrate") or {}
            status = info.get("status")
            if status == "completed":
                return dict(info)
            if status in ("failed", "cancelled"):
                raise LaunchError(f"migration {status}: {info.get('error-desc', info)}\n"
                                  f"{self.stderr_tail()}")
            self.check_alive()
            if time.monotonic() > deadline:
                raise LaunchError(f"migration not complete within {timeout:.0f}s "
                                  f"(status {status!r})")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def hmp(self, command: str) -> str:
        out = self.qmp("human-monitor-command", **{"command-line": command})
        return str(out)

    def poll_events(self) -> list[dict[str, Any]]:
        """Collect pending QMP events (GUEST_PANICKED, DEVICE_DELETED, ...)."""
        if self._qmp is None:
            return []
        with self._lock:
            new = self._qmp.get_events(wait=False)
            self._qmp.clear_events()
        self.events.extend(new)
        return new

    def wait_event(self, name: str, timeout: float, match: dict[str, Any] | None = None,
                   since: int = 0) -> dict[str, Any]:
        """Wait for a QMP event whose data contains ``match``; events stay recorded.

        ``since`` is an index into :attr:`events` (take ``len(events)`` before
        the command): an older event with the same data, e.g. the previous
        unplug of a reused device id, must not answer for the new one.
        """
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for ev in self.events[seen:]:
                data = ev.get("data", {})
                if ev.get("event") == name and all(
                    data.get(k) == v for k, v in (match or {}).items()
                ):
                    return ev
            seen = len(self.events)
            self.check_alive()
            if time.monotonic() > deadline:
                raise LaunchError(f"QMP event {name} {match or ''} not seen within {timeout}s")
            self._pull_one(0.1)

    def _pull_one(self, wait: float) -> None:
        with self._lock:
            if self._qmp is None:
                raise LaunchError("QMP is not connected")
            try:
                ev = self._qmp.pull_event(wait=wait)
            except TimeoutError:
                return
        if ev:
            self.events.append(ev)

    # -- shutdown ------------------------------------------------------------
    def shutdown(self, timeout: float = 5.0) -> int | None:
        """Soft first (QMP quit flushes the block layer), then SIGTERM, then SIGKILL.

        ``timeout`` bounds the quit's reply too: a QEMU whose main loop is blocked
        (waiting for a vhost-user back-end that does not answer) sends none, and
        waiting for it hung the teardown for as long as the back-end did.
        """
        if self._proc is None or self.state is RunState.STOPPED:
            return self.exitcode()
        log.info("shutting down QEMU for %s (pid %d)", self.name, self._proc.pid)
        if self._proc.poll() is None and self._qmp is not None:
            with contextlib.suppress(Exception), self._lock:
                self._qmp.settimeout(timeout)
                self._qmp.cmd_raw("quit")
        self._close_channels()
        self._wait_or_escalate(timeout)
        return self.exitcode()

    def wait_exit(self, timeout: float) -> int | None:
        """Wait for QEMU to exit by itself (a guest powering off); its status, or None.

        A guest panic still fails as one (pvpanic also powers off): the exit is
        checked like any other, with the panic event.
        """
        if self._proc is None:
            return None
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        with contextlib.suppress(Exception):
            self.poll_events()
        if self.panic_event() is not None:
            self.check_alive()  # raises GuestPanic with the console's panic line
        self._close_channels()
        self._stopped()
        return self._proc.returncode

    def kill(self) -> None:
        """Hard stop now: used on errors and by the reaper."""
        if self._proc is not None and self._proc.poll() is None:
            log.info("killing QEMU for %s (pid %d)", self.name, self._proc.pid)
        self._close_channels()
        self._wait_or_escalate(0.0)

    def _close_channels(self) -> None:
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self._console is not None:
            self._console.close()
            self._console = None

    def _wait_or_escalate(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        for sig, wait in ((None, timeout), (signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)):
            if sig is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self._stopped()

    def _stopped(self) -> None:
        """QEMU has exited: no longer live for the reaper (a failure stays FAILED)."""
        if self.state is not RunState.FAILED:
            self.state = RunState.STOPPED
        with _LIVE_LOCK:
            _LIVE.discard(self)

    # -- artifacts -----------------------------------------------------------
    def command_line(self) -> str:
        return shlex.join(self.argv)

    def write_reproducer(self) -> Path:
        """``reproduce.sh``: the exact command, runnable by hand (add -serial stdio)."""
        path = self.run_dir / "reproduce.sh"
        path.write_text(self.reproducer or (
            "#!/bin/sh\n# QEMU command line of this guest, as pytest-virtio ran it.\n"
            f"exec {self.command_line()} \"$@\"\n"
        ))
        path.chmod(0o755)
        return path

    def __enter__(self) -> Machine:
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
