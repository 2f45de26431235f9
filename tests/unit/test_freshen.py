"""The freshening helper's protocol, run by the host's own perl and dash.

Only malformed requests are sent: a well-formed one would set this host's
clock.  What a well-formed one does in a guest is tested by the snapshot
integration tests (clock, distinct random bytes, no trace left).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pytest_virtio.guests import freshen

pytestmark = pytest.mark.skipif(shutil.which("perl") is None, reason="no perl on this host")


def _sh(cmd: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=timeout)


def test_request_line_carries_the_clock_and_host_bytes() -> None:
    line = freshen.request_line(now=1700000000.25, entropy=b"\x01\xab" * 32)
    assert line == f"1700000000 250000 {'01ab' * 32} last"
    assert freshen.request_line(now=1.9999999, entropy=b"\0", last=False) == "2 0 00 stay"
    assert freshen.request_line() != freshen.request_line()  # new entropy every time


def _started(tmp_path: Path) -> Path:
    d = tmp_path / "helper"
    assert _sh(freshen.start_command(str(d))).returncode == 0
    for _ in range(200):
        if (d / "pid").exists() and (d / "pid").read_text().endswith("\n"):
            return d
        time.sleep(0.05)
    raise AssertionError("the helper did not write its pid")


def test_a_bad_request_gets_an_error_reply_and_the_helper_lives_on(tmp_path: Path) -> None:
    d = _started(tmp_path)
    pid = int((d / "pid").read_text())
    try:
        bad = _sh(freshen.request_command("1 2 zz stay", str(d)))
        assert bad.returncode == 1
        assert "freshening the guest failed: bad entropy" in bad.stderr
        bad = _sh(freshen.request_command("x 2 00 stay", str(d)))
        assert "bad clock 'x.2'" in bad.stderr
        assert Path(f"/proc/{pid}").exists()
        # A request that is not "stay" ends it and removes its FIFOs, even
        # when it fails: a garbled request leaves no helper behind.
        bad = _sh(freshen.request_command("hello", str(d)))
        assert "freshening the guest failed: bad request" in bad.stderr
        for _ in range(200):
            if not d.exists():
                break
            time.sleep(0.05)
        assert not d.exists()
    finally:
        subprocess.run(["kill", str(pid)], capture_output=True)


def test_no_helper_fails_at_once_instead_of_waiting(tmp_path: Path) -> None:
    d = tmp_path / "none"
    d.mkdir()
    res = _sh(freshen.request_command(freshen.request_line(), str(d)), timeout=5)
    assert res.returncode == 1 and "helper is not running" in res.stderr


def test_no_perl_fails_the_start_instead_of_hanging(tmp_path: Path) -> None:
    d = tmp_path / "helper"
    res = subprocess.run(["/bin/sh", "-c", freshen.start_command(str(d))], capture_output=True,
                         text=True, timeout=20, env={"PATH": str(tmp_path)})
    assert res.returncode != 0 and not d.exists()


def test_stop_command_ends_a_waiting_helper(tmp_path: Path) -> None:
    d = _started(tmp_path)
    pid = int((d / "pid").read_text())
    assert _sh(freshen.stop_command(str(d))).returncode == 0
    assert not d.exists()
    for _ in range(200):
        if not Path(f"/proc/{pid}").exists() or "Z" in _state(pid):
            return
        time.sleep(0.05)
    raise AssertionError("the helper outlived stop_command")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return "Z"
