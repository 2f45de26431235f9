"""``guest.poweroff()`` on the shipped default image (our init under busybox, no
poweroff program): QEMU exits by itself within seconds.  A guest with no way to
power off, or whose power-off command fails, is an error at once with the reason,
not a wait of 4x the command timeout (480 s under TCG) for an exit that never comes.
"""

from __future__ import annotations

import time

import pytest

from pytest_virtio.errors import CommandFailed, GuestError
from pytest_virtio.guests.guest import Guest

#: These tests' own bound on the wait; the answers below come far sooner.
WAIT = 120.0
#: What "at once" means here, under TCG on a loaded host.
SOON = 30.0


def test_poweroff_returns_once_qemu_exited(guest: Guest) -> None:
    start = time.monotonic()
    guest.poweroff(timeout=WAIT)
    took = time.monotonic() - start
    assert guest.machine.exitcode() == 0
    # QEMU exited because the guest powered off (QMP SHUTDOWN, guest: true), not on quit.
    shutdowns = [e["data"] for e in guest.machine.events if e.get("event") == "SHUTDOWN"]
    assert shutdowns and shutdowns[0]["guest"] is True, guest.machine.events
    assert took < SOON, took


def test_no_way_to_power_off_fails_at_once_with_the_reason(guest: Guest) -> None:
    guest.check("chmod a-x /bin/busybox")  # the applet cannot run; no poweroff program
    start = time.monotonic()
    with pytest.raises(CommandFailed, match=r"cannot power off: .*no poweroff applet"):
        guest.poweroff(timeout=WAIT)
    assert time.monotonic() - start < SOON
    assert guest.machine.exitcode() is None  # nothing was started: the guest runs on


FAILING_SYSTEMCTL = """\
#!/bin/sh
echo "Failed to connect to bus: No such file or directory" >&2
exit 1
"""


def test_a_failing_poweroff_command_is_an_error_at_once(guest: Guest) -> None:
    """A systemd guest whose systemctl cannot reach the bus (simulated: the marker
    directory and a systemctl that fails as that one does)."""
    guest.check(f"mkdir -p /run/systemd/system && printf '%s' '{FAILING_SYSTEMCTL}' "
                "> /usr/sbin/systemctl && chmod +x /usr/sbin/systemctl")
    start = time.monotonic()
    with pytest.raises(GuestError, match=r"could not power off: .*'systemctl poweroff' "
                                         r"exited 1") as failed:
        guest.poweroff(timeout=WAIT)
    assert time.monotonic() - start < SOON
    assert "Failed to connect to bus" in str(failed.value)  # its stderr, from the console
