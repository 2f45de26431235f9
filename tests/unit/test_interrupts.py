"""Signal plumbing that needs no guest: children found in /proc, SIGTERM as an interrupt."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from pytest_virtio.interrupts import child_pids, install_sigterm_handler, sigterm_to_interrupt


def _stat(proc: Path, pid: int, comm: str, state: str, ppid: int) -> None:
    (proc / str(pid)).mkdir()
    (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) {state} {ppid} {pid} 0 0\n")


def test_child_pids_parses_names_with_spaces_and_parens(tmp_path: Path) -> None:
    _stat(tmp_path, 10, "python", "S", 1)
    _stat(tmp_path, 11, "a (b) c", "R", 10)  # comm may hold ") " itself
    _stat(tmp_path, 12, "worker", "Z", 10)  # a zombie is not a live child
    _stat(tmp_path, 13, "other", "S", 99)
    (tmp_path / "14").mkdir()  # vanished between listing and reading
    assert child_pids(10, proc=tmp_path) == [11]


def test_child_pids_sees_a_real_child() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert child.pid in child_pids()
        assert child.pid not in child_pids(os.getppid())
    finally:
        child.kill()
        child.wait()
    assert child.pid not in child_pids()


def test_sigterm_becomes_keyboard_interrupt_once() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        assert install_sigterm_handler() is signal.SIG_DFL
        assert install_sigterm_handler() is None  # someone (we) already handles it
        with pytest.raises(KeyboardInterrupt, match="signal 15"):
            sigterm_to_interrupt(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second one kills
    finally:
        signal.signal(signal.SIGTERM, previous)
