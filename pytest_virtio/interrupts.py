"""Signals and process lifetimes: how an interrupted run still reaps every guest.

Three mechanisms, each for a way a run can end early:

- SIGTERM (a CI cancel, ``timeout``) becomes KeyboardInterrupt, so pytest
  unwinds and tears fixtures down exactly as for Ctrl-C.
- ``PR_SET_PDEATHSIG`` (prctl(2)): the kernel signals a child when its parent
  dies, even by SIGKILL.  QEMU gets SIGKILL (``setpriv`` sets it between fork
  and exec, see qemu/machine.py); an xdist worker gets SIGTERM, which the first
  mechanism turns into a clean teardown.
- An interrupted xdist controller passes the interrupt on to its workers at
  once.  A signal sent to the controller alone (``kill PID``, most CI runners)
  never reaches them: xdist would let them run on, booting new guests, for up
  to ten seconds before killing them, which leaves their run directories and
  sockets behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def sigterm_to_interrupt(signum: int, frame: Any) -> None:
    """SIGTERM → KeyboardInterrupt, so fixtures tear down and guests are reaped.

    Python's default SIGTERM ends the process without unwinding: QEMU would die
    by PDEATHSIG but run directories and sockets would stay until a later sweep.
    A second SIGTERM kills at once (the default is restored first).
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt(f"pytest-virtio: received signal {signum} (SIGTERM)")


def install_sigterm_handler() -> Any:
    """Install :func:`sigterm_to_interrupt` unless someone else handles SIGTERM.

    Returns the handler it replaced (to restore later), or None if it left
    SIGTERM alone.
    """
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, sigterm_to_interrupt)


def term_with_parent() -> None:
    """An xdist worker outlives a SIGKILLed controller (it sits in a test): ask the
    kernel for SIGTERM when the parent goes, which the handler turns into teardown."""
    parent = os.getppid()
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:  # the controller died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def child_pids(pid: int | None = None, proc: Path = Path("/proc")) -> list[int]:
    """Live direct children of ``pid`` (default: this process), from /proc/*/stat."""
    pid = os.getpid() if pid is None else pid
    children = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if len(fields) > 1 and fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            children.append(int(stat.parent.name))
    return sorted(children)


def descendants(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """``pid``'s live children, their children, and so on (``pid`` itself not included)."""
    found: list[int] = []
    todo = child_pids(pid, proc)
    while todo:
        found.append(todo.pop())
        todo += child_pids(found[-1], proc)
    return sorted(found)


def forward_to_children(sig: int = signal.SIGTERM) -> list[int]:
    """Send ``sig`` to every live child (an xdist controller's children are its workers)."""
    sent = []
    for child in child_pids():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, sig)
            sent.append(child)
    return sent
