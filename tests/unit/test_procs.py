"""Helper processes die with pytest: real helpers, a real SIGKILL of their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pytest_virtio import procs
from pytest_virtio.errors import MissingToolError
from pytest_virtio.images.mounts import mounted_anywhere, mounts_under
from pytest_virtio.interrupts import descendants

#: A stand-in for pytest: starts a helper with procs.start, says so, then waits to be killed.
PARENT = textwrap.dedent("""
    import sys, threading, time
    from pytest_virtio import procs
    argv, contain = sys.argv[2:], sys.argv[1] == "contain"
    box = []
    # From a thread that ends at once: the death signal must outlive it.
    t = threading.Thread(target=lambda: box.append(procs.start(argv, contain=contain)))
    t.start(); t.join()
    print(box[0].pid, flush=True)
    time.sleep(600)
""")


def _parent_with_helper(argv: list[str], contain: bool) -> tuple[int, subprocess.Popen[str]]:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, "contain" if contain else "plain", *argv],
        stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    return int(parent.stdout.readline()), parent


def test_a_helper_dies_with_its_killed_parent_even_when_a_thread_started_it() -> None:
    helper, parent = _parent_with_helper(["sleep", "600"], contain=False)
    try:
        time.sleep(0.3)
        assert procs.running(helper), "the helper died with the thread that started it"
        assert os.getpgid(helper) == helper  # its own process group: Ctrl-C reaches pytest
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert procs.wait_gone([helper], 5.0) == []
    finally:
        parent.kill()
        parent.wait()
        if procs.running(helper):
            os.kill(helper, signal.SIGKILL)


@pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace needs root, as the build does")
def test_a_contained_helper_takes_its_children_and_mounts_along(tmp_path: Path) -> None:
    """What a parent-death signal alone cannot: grandchildren and mounts go too."""
    (tmp_path / "proc").mkdir()
    script = (f"mount -t tmpfs pvtest {tmp_path}/proc && touch {tmp_path}/mounted && "
              "sleep 600 & sleep 600")
    helper, parent = _parent_with_helper(["sh", "-c", script], contain=True)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "mounted").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = [helper, *descendants(helper)]
        assert len(tree) >= 4, tree  # unshare, sh (PID 1 inside), the subshell, the sleeps
        assert list(mounted_anywhere(tmp_path)) == [tmp_path / "proc"]
        assert mounts_under(tmp_path) == []  # never visible outside its namespace
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert procs.wait_gone(tree, 5.0) == []
        assert mounted_anywhere(tmp_path) == {}
    finally:
        parent.kill()
        parent.wait()


def test_stop_terminates_then_kills_and_reports_the_status() -> None:
    polite = procs.start(["sleep", "600"])
    assert procs.stop(polite) == -signal.SIGTERM
    stubborn = procs.start(["sh", "-c", "trap '' TERM; echo ready; sleep 600"],
                           stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == "ready\n"
    start = time.monotonic()
    assert procs.stop(stubborn, grace=0.3) == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - start < 5


def test_missing_util_linux_names_the_package(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # setpriv is in /usr/bin
    with pytest.raises(MissingToolError, match=r"setpriv not found .*apt-get install util-linux"):
        procs.start(["true"])


def test_one_long_lived_spawner_thread_forks_for_every_other_thread() -> None:
    started: list[subprocess.Popen[bytes]] = []
    threads = [threading.Thread(target=lambda: started.append(procs.start(["true"])))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spawners = [t for t in threading.enumerate() if t.name == "pytest-virtio-spawner"]
    assert len(spawners) == 1 and spawners[0].daemon
    assert [procs.stop(p) for p in started] == [0, 0, 0]
