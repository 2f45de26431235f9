"""The console without a guest: the tail shown in errors, failure messages, and the
command channel's framing against a real dash over socketpairs."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_virtio.channels.console import Console, FrameScan, command_lines, tail_of, unframe
from pytest_virtio.channels.runners import Result
from pytest_virtio.errors import (
    ChannelError,
    CommandFailed,
    GuestPanic,
    GuestTimeout,
    ShellRestarted,
)

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
        Result(cmd="false", rc=1, stdout_bytes=b"",
               stderr_bytes=b"no such file").check("kernel says hi")
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
    result = Result(cmd="true", rc=0, stdout_bytes=b"")
    assert result.check() is result


# --------------------------------------------------------------------------- the channel
# The real Console over socketpairs: the command channel's far end is a real dash
# (the guest's /bin/sh), the kernel console's far end is ours to print on.


LINE_FD = 9  # dash redirects single-digit descriptors only


@pytest.fixture
def dash(tmp_path: Path) -> Iterator[tuple[Console, socket.socket]]:
    kernel, kernel_end = socket.socketpair()
    ours, shell_end = socket.socketpair()
    env = {"PATH": "/usr/bin:/bin", "PS1": "", "PS2": "", "HOME": str(tmp_path),
           "TMPDIR": str(tmp_path)}  # the frame files stay in the test's tree
    # The line is also kept open as fd LINE_FD, as a command could reach its
    # terminal in a guest (stdout and stderr are its files).
    line = shell_end.fileno()
    proc = subprocess.Popen(["dash", "-i"], stdin=shell_end, stdout=shell_end,
                            stderr=subprocess.DEVNULL, env=env, cwd=tmp_path,
                            pass_fds=(LINE_FD,), preexec_fn=lambda: os.dup2(line, LINE_FD))
    shell_end.close()
    console = Console(kernel, ours, tmp_path / "console.log")
    console.adopt_booted()
    yield console, kernel_end
    assert not list(Path("/tmp").glob(f".pv-{NONCE}.*"))  # nothing outside the test's tree
    proc.kill()
    proc.wait()
    for sock in (kernel, kernel_end, ours):
        sock.close()


@pytest.mark.parametrize("data", [
    b"a\r\nb\r", b"nul\x00inside", b"\xff\xfe not utf-8 \xc3", b"no newline at end",
    b"\n\n\n", b"", bytes(range(1, 256)),
])
def test_output_comes_back_byte_exact(dash: tuple[Console, socket.socket], data: bytes) -> None:
    console, _ = dash
    octal = "".join(f"\\{b:03o}" for b in data)
    result = console.run(f"printf '{octal}'; printf '{octal}' >&2", timeout=10)
    assert (result.rc, result.stdout_bytes, result.stderr_bytes) == (0, data, data)


def test_commands_of_any_syntax_and_length_arrive_intact(
        dash: tuple[Console, socket.socket]) -> None:
    console, _ = dash
    syntax = console.run("echo )", timeout=10)
    assert syntax.rc == 2 and "Syntax error" in syntax.stderr
    quote = console.run("echo 'unterminated", timeout=10)
    assert quote.rc == 2 and "Unterminated quoted string" in quote.stderr
    assert console.run("echo after", timeout=10).stdout == "after\n", "the channel wedged"
    long = "x" * 5000
    echoed = console.run(f"v='{long}'; printf %s \"$v\" | wc -c", timeout=10)
    assert echoed.stdout.strip() == "5000"
    odd = "printf '%s|' \"a'b\" 'c\"d' '\\' \"$(printf '\\003\\r')\" \"é\"; echo $1 $#"
    assert console.run(odd, timeout=10).stdout_bytes == "a'b|c\"d|\\|\x03\r|é|0\n".encode()


def test_output_that_looks_like_a_panic_is_only_output(
        dash: tuple[Console, socket.socket]) -> None:
    console, _ = dash
    text = ("Kernel panic - not syncing: this is only text\nPYTEST-VIRTIO-NO-ROOT label=x\n"
            "ALERT!  LABEL=pvroot does not exist.  Dropping to a shell!\n")
    assert console.run(f"printf '{text}'", timeout=10).stdout == text


def test_a_panic_on_the_kernel_console_ends_a_command_at_once(
        dash: tuple[Console, socket.socket]) -> None:
    console, kernel_end = dash
    threading.Timer(0.3, lambda: kernel_end.sendall(
        b"[ 9.1] Kernel panic - not syncing: sysrq triggered crash\r\n")).start()
    start = time.monotonic()
    with pytest.raises(GuestPanic, match="sysrq triggered crash"):
        console.run("sleep 30", timeout=60)
    assert time.monotonic() - start < 10


def test_kernel_messages_never_mix_into_a_result(dash: tuple[Console, socket.socket]) -> None:
    console, kernel_end = dash
    kernel_end.sendall(b"[ 3.2] virtio_blk virtio1: [vdb] 2048 512-byte blocks\r\n")
    assert console.run("echo a; sleep 0.2; echo b", timeout=10).stdout == "a\nb\n"


def test_a_command_past_its_timeout_is_resynchronised(
        dash: tuple[Console, socket.socket]) -> None:
    """No terminal here, so no ^C: the next command waits for the shell to come back."""
    console, _ = dash
    with pytest.raises(GuestTimeout):
        console.run("sleep 1.5; echo late", timeout=0.5)
    assert console.run("echo back", timeout=10).stdout == "back\n"


def test_a_shell_restarted_during_a_command_fails_it_at_once(
        dash: tuple[Console, socket.socket]) -> None:
    """What init's loop prints for a new shell ends the wait: no frame will come."""
    console, _ = dash
    start = time.monotonic()
    with pytest.raises(ShellRestarted, match="died before the command's result"):
        console.run(f"echo PYTEST-VIRTIO-READY 12.5 >&{LINE_FD}; sleep 30", timeout=60)
    assert time.monotonic() - start < 10


def test_a_shell_that_never_comes_back_is_declared_lost(
        dash: tuple[Console, socket.socket]) -> None:
    console, _ = dash
    with pytest.raises(GuestTimeout):
        console.run("kill -STOP $$", timeout=0.5)
    with pytest.raises(GuestTimeout, match=r"did not come back within 2s .*the guest is lost"):
        console.run("echo back", timeout=2)


def test_frame_scan_reads_a_frame_split_anywhere() -> None:
    nonce = "0123456789abcdef"
    stream = (b"noise " + nonce.encode() + b"S\nout\n" + b"\n" + nonce.encode() + b"E 7\n"
              + b"err" + b"\n" + nonce.encode() + b"F\ntrailing")
    for cut in range(1, len(stream)):
        scan = FrameScan(nonce)
        buf = bytearray()
        assert scan(buf) is None
        buf += stream[:cut]
        first = scan(buf)
        buf += stream[cut:]
        frame = first or scan(buf)
        assert frame is not None, cut
        assert (frame.rc, frame.stdout, frame.stderr) == (7, b"out\n", b"err")
        assert stream[frame.end:] == b"trailing"


def test_command_lines_refuse_nul_and_stay_short_quoted_lines() -> None:
    with pytest.raises(ValueError, match="NUL"):
        command_lines("echo \0")
    lines = command_lines("é'" * 3000 + "\x03\x1a" * 600)
    assert all(len(line) <= 1010 and "\n" not in line for line in lines)
    assert lines[0].startswith("pv_a '\xc3\xa9'\\''") and lines[-1].startswith("pv_o '\\003\\032")
    assert command_lines("a\nb\tc") == ["pv_a 'a\nb\tc'"]


def test_words_of_the_shell_inside_a_frame_are_output() -> None:
    """A whole frame in one read: its body may say anything, READY included."""
    nonce = "0123456789abcdef"
    body = b"PYTEST-VIRTIO-READY 1.0\n" + nonce.encode() + b"L 3\n"
    stream = nonce.encode() + b"S\n" + body + b"\n" + nonce.encode() + b"E 0\n\n" + \
        nonce.encode() + b"F\n"
    frame = FrameScan(nonce)(stream)
    assert frame is not None and frame.stdout == body


def test_a_chatty_kernel_console_does_not_hold_a_wait_past_its_deadline(
        dash: tuple[Console, socket.socket]) -> None:
    console, kernel_end = dash
    stop = threading.Event()

    def chatter() -> None:
        while not stop.is_set():
            kernel_end.sendall(b"[ 5.0] eth0: link is not ready\r\n")
            time.sleep(0.002)

    threading.Thread(target=chatter, daemon=True).start()
    start = time.monotonic()
    try:
        with pytest.raises(GuestTimeout):
            console.run("sleep 6", timeout=1)
    finally:
        stop.set()
    assert time.monotonic() - start < 4


def test_a_false_ready_line_leaves_the_next_command_working(
        dash: tuple[Console, socket.socket]) -> None:
    console, _ = dash
    with pytest.raises(ShellRestarted):
        console.run(f"echo PYTEST-VIRTIO-READY 12.5 >&{LINE_FD}; sleep 2", timeout=10)
    assert console.run("echo back", timeout=10).stdout == "back\n"


def test_a_command_too_long_for_the_line_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at most 256 KiB"):
        command_lines("x" * (257 << 10))
    assert len(command_lines("x" * (256 << 10))) > 200  # long but fine, and fast


def test_output_files_that_cannot_be_created_are_named() -> None:
    nonce = "0123456789abcdef"
    with pytest.raises(ChannelError, match="could not create the command's output files"):
        FrameScan(nonce)(nonce.encode() + b"N\n")
