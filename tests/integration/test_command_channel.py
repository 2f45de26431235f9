"""The command channel on a real guest (issue 23 item 2): exact, separate, resilient.

The kernel keeps ttyS0; the shell serving ``guest.run`` is alone on ttyS1 in raw
mode.  Each test here failed on the one-line console: look-alike output raised
GuestPanic/GuestError, CR was stripped, a syntax error was a 20 s timeout that
wedged the next command, ``kill -9 $$`` lost the console, a cooked terminal cut a
long command to 4095 bytes and returned rc 0, a background job's kernel-console
writes landed in another command's stdout, and 1 MB of output took 114 s.
One guest for the module (boots are the expensive part under TCG); a panic during
a command is still caught at once (tests/integration/test_failfast.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_virtio.errors import ChannelMode, GuestTimeout, ShellRestarted
from pytest_virtio.guests.guest import Guest
from pytest_virtio.spec import MachineSpec
from pytest_virtio.spec.context import command_channel_log

#: The guest's terminal behind each command-channel transport.
TTY = {"serial": "/dev/ttyS1", "virtio-console": "/dev/hvc0"}


@pytest.fixture(scope="module", params=sorted(TTY))
def g(request: pytest.FixtureRequest, boot_shared: Callable[[MachineSpec, str], Guest]) -> Guest:
    """Every property below holds on both transports: the same framing over ttyS1 and hvc0."""
    return boot_shared(MachineSpec(nics=(), command_channel=request.param), request.param)


def test_the_shell_is_served_on_the_transports_terminal(g: Guest) -> None:
    tty = TTY[g.spec.command_channel]
    assert g.run("readlink /proc/$$/fd/0").stdout.strip() == tty
    assert g.run("tty").stdout.strip() in (tty, "not a tty")


def test_output_that_looks_like_a_boot_failure_is_only_output(g: Guest) -> None:
    text = ("Kernel panic - not syncing: this is only text\n"
            "PYTEST-VIRTIO-NO-ROOT label=pvroot blockdevs= loaded=\n"
            "ALERT!  LABEL=pvroot does not exist.  Dropping to a shell!\n"
            "PYTEST-VIRTIO-READY 1.00\n")
    result = g.run(f"printf '{text}'; printf '{text}' >&2")
    assert (result.rc, result.stdout, result.stderr) == (0, text, text)
    assert g.run("echo still-here").stdout == "still-here\n"


def test_output_is_byte_exact(g: Guest) -> None:
    crlf = g.run(r"printf 'a\r\nb\rc\000d\377'")
    assert crlf.stdout_bytes == b"a\r\nb\rc\x00d\xff"
    g.check("head -c 300000 /dev/urandom > /tmp/rnd")
    digest = g.check("sha256sum /tmp/rnd").stdout.split()[0]
    got = g.run("cat /tmp/rnd").stdout_bytes
    assert len(got) == 300000 and hashlib.sha256(got).hexdigest() == digest


def test_a_megabyte_of_output_arrives_whole(g: Guest) -> None:
    g.check("yes 0123456789abcdef | head -c 1048576 > /tmp/mb")
    # Within the default command timeout: the quadratic reader this replaces
    # needed 114 s for this much (speed figures: benchmarks/console_output.py).
    out = g.run("cat /tmp/mb").stdout_bytes
    assert out == (b"0123456789abcdef\n" * 61681)[:1048576], f"{len(out)} bytes"


def test_syntax_errors_are_the_shells_own_and_wedge_nothing(g: Guest) -> None:
    paren = g.run("echo )")
    assert paren.rc == 2 and "Syntax error" in paren.stderr
    quote = g.run("echo 'unterminated")
    assert quote.rc == 2 and "Unterminated quoted string" in quote.stderr
    assert g.run("echo fine").stdout == "fine\n"


def test_long_commands_with_any_bytes_arrive_intact(g: Guest) -> None:
    payload = "".join(chr(c) for c in range(32, 127) if c != ord("'")) * 60  # 5,640 chars
    result = g.run(f"printf %s '{payload}' | wc -c")
    assert result.stdout.strip() == str(len(payload))
    assert g.run("printf '%s' \"$(printf '\\r\\003')x\" | od -An -c").stdout.split() == [
        "\\r", "003", "x"]


def test_kernel_messages_and_background_console_writes_stay_out(g: Guest) -> None:
    g.check("( for i in 1 2 3 4 5 6; do echo BG-NOISE > /dev/console; "
            "echo '<0>KMSG-NOISE' > /dev/kmsg; sleep 0.1; done ) &")
    for _ in range(3):
        assert g.run("sleep 0.2; echo clean").stdout == "clean\n"
    assert "BG-NOISE" in g.machine.console.tail(200)


def test_a_killed_shell_fails_its_command_at_once_and_the_next_one_works(g: Guest) -> None:
    # Several rounds: the resync's ^C used to kill the next shell while it was
    # still starting, and the one after began reading inside a line's quote and
    # never answered (CI, and 3 of 3 loaded runs within 4 rounds; 40 of 40 now).
    log = Path(command_channel_log(g.machine.console_log))
    announced = log.read_bytes().count(b"PYTEST-VIRTIO-READY")
    for round_ in range(6):
        start = time.monotonic()
        with pytest.raises(ShellRestarted, match="kill -9"):
            g.run("kill -9 $$", timeout=120)
        assert time.monotonic() - start < 30, f"round {round_}: waited for the timeout"
        assert g.run("echo back").stdout == "back\n"
        assert g.run("echo )").rc == 2  # the new shell has the functions too
    # One announcement per restart: a shell that says READY is past the point
    # where the host's ^C could kill it.
    text = log.read_bytes()
    assert text.count(b"PYTEST-VIRTIO-READY") - announced == 6, text[-2000:]


def test_a_changed_terminal_mode_is_an_error_not_a_wrong_result(g: Guest) -> None:
    with pytest.raises(ChannelMode, match="mode"):
        g.run(f"stty sane < {TTY[g.spec.command_channel]}; printf 'x\\ny\\n'")
    long = "y" * 5000
    result = g.run(f"v='{long}'; echo ${{#v}}")
    assert (result.rc, result.stdout) == (0, "5000\n")


def test_an_interrupted_command_leaves_the_channel_usable(g: Guest) -> None:
    with pytest.raises(GuestTimeout):
        g.run("sleep 60", timeout=2)
    assert g.run("echo after-timeout").stdout == "after-timeout\n"
