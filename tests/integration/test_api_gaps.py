"""Issue 23's small API gaps, seen from inside a real guest (one booted guest shared
by the module): a 36-character serial on virtio-scsi, block sizes on virtio-blk and
virtio-scsi, ``guest.hotplug`` with a marker's dict, ``guest.resize_disk`` on the
buses that tell the guest and on LSI SCSI, which the guest is asked to rescan, and
``guest.pause``/``resume`` with a command refused at once while paused.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from pytest_virtio.errors import ConfigError, GuestError
from pytest_virtio.guests.guest import Guest
from pytest_virtio.spec import Disk, MachineSpec

SCSI_SERIAL = "SCSI-SERIAL-0123456789abcdefghijklmn"  # 36: all of scsi-hd's VPD 0x80

SPEC = MachineSpec(disks=(
    Disk(name="scsi36", bus="virtio-scsi", size="8M", serial=SCSI_SERIAL,
         physical_block_size=4096),
    Disk(name="blk4k", bus="virtio-blk", size="8M", logical_block_size=4096),
    Disk(name="scsi4k", bus="virtio-scsi", size="8M", logical_block_size=4096),
    Disk(name="grow_blk", bus="virtio-blk", size="8M"),
    Disk(name="grow_scsi", bus="virtio-scsi", size="8M"),
    Disk(name="grow_lsi", bus="lsi", size="8M"),
))


@pytest.fixture(scope="module")
def guest(boot_shared: Callable[[MachineSpec, str], Guest]) -> Guest:
    return boot_shared(SPEC, "gaps")


def _sysfs(guest: Guest, name: str, attr: str) -> int:
    dev = guest.disk_path(name).removeprefix("/dev/")
    return int(guest.check(f"cat /sys/block/{dev}/{attr}").stdout)


def test_a_36_character_serial_on_virtio_scsi_reaches_the_guest(guest: Guest) -> None:
    dev = guest.disk_path("scsi36").removeprefix("/dev/")
    vpd = guest.check(f"tail -c +5 /sys/block/{dev}/device/vpd_pg80 | tr -d '\\000'").stdout
    assert vpd == SCSI_SERIAL
    assert guest.block_devices()[dev] == SCSI_SERIAL


@pytest.mark.parametrize(("name", "logical", "physical"), [
    ("blk4k", 4096, 4096),      # physical follows the logical block
    ("scsi4k", 4096, 4096),
    ("scsi36", 512, 4096),
])
def test_the_guest_sees_the_block_sizes(guest: Guest, name: str, logical: int,
                                        physical: int) -> None:
    assert _sysfs(guest, name, "queue/logical_block_size") == logical
    assert _sysfs(guest, name, "queue/physical_block_size") == physical


def test_hotplug_takes_the_markers_disk_dict(guest: Guest) -> None:
    path = guest.hotplug({"name": "hot", "bus": "virtio-scsi", "size": "8M",
                          "serial": "HOT-" + "x" * 32, "logical_block_size": 4096})
    try:
        dev = path.removeprefix("/dev/")
        assert guest.block_devices()[dev] == "HOT-" + "x" * 32
        assert _sysfs(guest, "hot", "queue/logical_block_size") == 4096
        # A hot-plugged disk's drv-<disk> is a blockdev-add node-name, not a -drive id.
        assert guest.resize_disk("hot", "16M") == 16 << 20
        assert _sysfs(guest, "hot", "size") * 512 == 16 << 20
    finally:
        guest.unplug("hot")
    with pytest.raises(ConfigError, match=r"^guest.hotplug\(disk\): unknown key 'sise' \("):
        guest.hotplug({"bus": "virtio-blk", "sise": "8M"})
    assert guest.hotplug("virtio-blk") == guest.disk_path("disk0")  # unnamed: first free disk<i>
    guest.unplug("disk0")


@pytest.mark.parametrize("name", ["grow_blk", "grow_scsi", "grow_lsi"])
def test_resize_disk_the_guest_sees_the_new_capacity(guest: Guest, name: str) -> None:
    assert _sysfs(guest, name, "size") * 512 == 8 << 20
    assert guest.resize_disk(name, "24M") == 24 << 20
    dev = guest.disk_path(name)
    assert int(guest.check(f"blockdev --getsize64 {dev}").stdout) == 24 << 20


def test_resize_disk_refusals(guest: Guest) -> None:
    with pytest.raises(ConfigError, match=r"no data disk of that name; this guest has: "):
        guest.resize_disk("ghost", "16M")
    with pytest.raises(ConfigError, match="4096-byte blocks"):
        guest.resize_disk("blk4k", "6K")


def test_pause_refuses_commands_at_once_and_resume_lets_them_run(guest: Guest) -> None:
    guest.pause()
    try:
        assert not guest.is_running()
        start = time.monotonic()
        with pytest.raises(GuestError, match=r"guest 'gaps' is paused \(QEMU run state "
                                             r"'paused'\): a command cannot run until"):
            guest.run("true", timeout=60)
        assert time.monotonic() - start < 5, "waited for the command timeout"
    finally:
        guest.resume()
    assert guest.is_running()
    assert guest.run("echo back").stdout == "back\n"


def test_a_pause_through_raw_qmp_is_seen_too(guest: Guest) -> None:
    guest.machine.qmp("stop")
    try:
        with pytest.raises(GuestError, match="is paused"):
            guest.check("true", timeout=60)
    finally:
        guest.machine.qmp("cont")
    assert guest.check("true").ok
