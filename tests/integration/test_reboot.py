"""Reboots the test asks for (issue 25 item 3): from inside and by QMP reset.

Each boot must be a new one (its own boot id), and every channel must serve it:
the console's shell, SSH (dropbear makes a new host key each boot: the new one
is pinned), the guest agent, and the disks, a hot-plugged one and one served by
the in-process vhost-user-blk backend (the guest's driver resets the device and
sets its rings up again).  A reboot nobody asked for still ends the guest, as
``-no-reboot`` always made it.
"""

from __future__ import annotations

import pytest

from pytest_virtio.guests.guest import Guest
from pytest_virtio.spec import Disk


def _boot_id(guest: Guest, via: str = "console") -> str:
    return guest.check("cat /proc/sys/kernel/random/boot_id", via=via).stdout.strip()


@pytest.mark.vm(nics=["virtio-net"], devices=["agent"])
def test_three_reboots_from_inside_each_a_new_boot_with_every_channel_back(
        guest: Guest) -> None:
    seen = [_boot_id(guest, via="ssh")]
    keys = {guest.host_key}
    assert guest.run("echo ok", via="agent").stdout == "ok\n"
    for _ in range(3):
        guest.check("echo before > /tmp/mark")  # /tmp is RAM: a real reboot loses it
        guest.reboot()
        now = _boot_id(guest)
        assert now not in seen, "the guest did not boot again"
        seen.append(now)
        assert guest.run("cat /tmp/mark").rc != 0
        assert _boot_id(guest, via="ssh") == now
        assert guest.run("cat /proc/sys/kernel/random/boot_id", via="agent").stdout.strip() == now
        keys.add(guest.host_key)
        assert guest.boot_uptime is not None and guest.boot_uptime < 120
    assert len(keys) == 4, "each boot announced a host key of its own and it was pinned"
    assert guest.machine.exitcode() is None


@pytest.mark.vm(disks=[{"name": "vu", "bus": "vhost-user-blk", "size": "16M"}])
def test_reset_keeps_hotplugged_and_vhost_user_disks_and_their_data(guest: Guest) -> None:
    hot = guest.hotplug(Disk(name="hot", bus="virtio-blk", size="8M"))
    vu = guest.disk_path("vu")
    for dev, token in ((hot, "hot-token"), (vu, "vu-token")):
        guest.check(f"printf {token} | dd of={dev} bs=4096 conv=sync oflag=direct 2>/dev/null")
    before = _boot_id(guest)
    guest.reset()
    assert _boot_id(guest) != before
    for name, token in (("hot", "hot-token"), ("vu", "vu-token")):
        dev = guest.disk_path(name)
        read = guest.check(f"dd if={dev} bs=4096 count=1 iflag=direct 2>/dev/null | "
                           f"head -c {len(token)}")
        assert read.stdout == token, name
    guest.check(f"dd if=/dev/zero of={guest.disk_path('vu')} bs=64k count=64 oflag=direct")
    assert guest.backends["vu"].check() is None  # the backend took the device reset
    resets = [e for e in guest.machine.events if e.get("event") == "RESET"]
    assert resets, guest.machine.events


def test_a_reboot_nobody_asked_for_still_ends_the_guest(guest: Guest) -> None:
    guest.reboot()  # one asked for: allowed for that boot only
    guest.check("(sleep 0.5; /bin/busybox reboot -f) >/dev/null 2>&1 &")
    assert guest.machine.wait_exit(60 * guest.timeout_scale) == 0
    shutdowns = [e["data"] for e in guest.machine.events if e.get("event") == "SHUTDOWN"]
    assert shutdowns and shutdowns[-1]["reason"] == "guest-reset", shutdowns
