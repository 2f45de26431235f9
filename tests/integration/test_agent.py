"""run(via="agent"): commands through the real qemu-ga in the guest, over virtio-serial."""

from __future__ import annotations

import pytest

from pytest_virtio.channels.agent import AgentError
from pytest_virtio.errors import ConfigError, GuestError, GuestTimeout
from pytest_virtio.guests.guest import Guest

# One guest for the module: the agent keeps answering after each test's errors,
# which the tests check themselves; two boots fewer per run under TCG.
pytestmark = pytest.mark.vm(devices=["agent"], scope="module")


def test_agent_runs_commands_like_the_console(guest: Guest) -> None:
    res = guest.run("echo out; echo err >&2; exit 3", via="agent")
    assert (res.rc, res.stdout, res.stderr, res.via) == (3, "out\n", "err\n", "agent")
    assert guest.check("cat /proc/sys/kernel/hostname", via="agent").stdout == \
        guest.check("cat /proc/sys/kernel/hostname").stdout
    assert guest.run("kill -9 $$", via="agent").rc == 128 + 9


def test_agent_output_is_byte_exact_and_large(guest: Guest) -> None:
    """256 KiB of random bytes, hex-encoded (qemu-ga base64s what it captured)."""
    out = guest.check("head -c 262144 /dev/urandom | od -An -v -tx1 | tr -d ' \\n'; "
                      "echo", via="agent").stdout.strip()
    assert len(out) == 2 * 262144 and set(out) <= set("0123456789abcdef")


def test_agent_timeout_and_errors_are_precise(guest: Guest) -> None:
    with pytest.raises(GuestTimeout, match="via the agent did not finish within 2s"):
        guest.run("sleep 30", timeout=2, via="agent")
    assert guest.check("echo still-here", via="agent").stdout == "still-here\n"
    with pytest.raises(AgentError, match="guest-no-such-command"):
        guest.agent.execute("guest-no-such-command")
    assert guest.agent.execute("guest-ping") == {}


def test_no_agent_device_is_a_clear_error(make_guest) -> None:  # type: ignore[no-untyped-def]
    plain = make_guest(name="plain", devices=[])
    with pytest.raises(GuestError, match=r"no guest agent: add devices=\['agent'\]"):
        plain.run("true", via="agent")
    with pytest.raises(ConfigError, match="choose one of console, ssh, agent"):
        plain.run("true", via="telepathy")
