"""Console helpers that need no guest: the tail shown in errors, failure messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_virtio.console import tail_of, unframe
from pytest_virtio.errors import CommandFailed
from pytest_virtio.runners import Result

NONCE = "0123456789abcdef"


def test_unframe_drops_markers_and_their_blank_lines() -> None:
    log = ["[    1.0] virtio_blk virtio1: [vda] 2048 512-byte blocks",
           f"{NONCE}S", "hello", "", f"{NONCE}E 0", "oops", "", f"{NONCE}F",
           f"{NONCE}Z", "[    2.0] EXT4-fs (vda): mounted"]
    assert unframe(log) == ["[    1.0] virtio_blk virtio1: [vda] 2048 512-byte blocks",
                            "hello", "oops", "[    2.0] EXT4-fs (vda): mounted"]


def test_unframe_keeps_lines_that_only_look_like_markers() -> None:
    log = ["", "0123456789abcdefS trailing", "0123456789ABCDEFS", "deadbeefS", ""]
    assert unframe(log) == log


def test_tail_of_reads_the_last_lines_without_markers(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    lines = [f"line {i}" for i in range(60)] + [f"{NONCE}S", "out", "", f"{NONCE}E 1", f"{NONCE}F"]
    log.write_bytes("\r\n".join(lines).encode())
    tail = tail_of(log, lines=3).splitlines()
    assert tail == ["line 58", "line 59", "out"]
    assert tail_of(tmp_path / "missing.log") == ""


def test_failed_command_message_marks_empty_streams() -> None:
    with pytest.raises(CommandFailed) as info:
        Result(cmd="false", rc=1, stdout="", stderr="no such file").check("kernel says hi")
    text = str(info.value)
    assert text.splitlines() == [
        "guest command failed (exit 1, via console): false",
        "--- stdout: (empty) ---",
        "--- stderr ---",
        "no such file",
        "--- console tail ---",
        "kernel says hi",
    ]


def test_passing_command_check_returns_the_result() -> None:
    result = Result(cmd="true", rc=0, stdout="")
    assert result.check() is result
