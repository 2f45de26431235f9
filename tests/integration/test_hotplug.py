"""Hot-plug and hot-unplug of data disks through QMP, seen from inside the guest.

One guest on the ``pc`` machine (ACPI PCI hotplug via the built-in acpiphp)
with a virtio-scsi disk at boot, so the ``scsi0`` controller exists for
hot-added SCSI disks. Each bus that can be hot-plugged gets a disk, I/O, and
an unplug after which neither QEMU nor the guest still has it.
"""

from __future__ import annotations

import pytest

from pytest_virtio.errors import ConfigError
from pytest_virtio.guests.guest import Guest
from pytest_virtio.spec import EXPECTED_DRIVER, Disk

HOTPLUG_BUSES = ("virtio-blk", "virtio-scsi", "vhost-user-blk")


def _roundtrip(guest: Guest, dev: str, token: str) -> str:
    """Write ``token`` to the first block of ``dev`` with O_DIRECT and read it back."""
    guest.check(f"printf '%s' {token} | dd of={dev} bs=4096 conv=sync oflag=direct 2>/dev/null")
    read = f"dd if={dev} bs=4096 count=1 iflag=direct 2>/dev/null | head -c {len(token)}"
    out = guest.check(read)
    return out.stdout


def _peripherals(guest: Guest) -> set[str]:
    """QEMU's user-created devices (QOM /machine/peripheral), by id."""
    return {p["name"] for p in guest.machine.qmp("qom-list", path="/machine/peripheral")}


@pytest.mark.vm(disks=[{"name": "boot0", "bus": "virtio-scsi", "size": "8M"}])
def test_hotplug_io_and_unplug_every_hotpluggable_bus(guest: Guest) -> None:
    before = set(guest.block_devices())
    paths = {}
    for bus in HOTPLUG_BUSES:
        name = "hp_" + bus.replace("-", "_")
        paths[bus] = guest.hotplug(Disk(name=name, bus=bus, size="8M"))
        assert paths[bus].removeprefix("/dev/") not in before, f"{bus} reused a boot device"
        assert EXPECTED_DRIVER[bus] in guest.disk_drivers(name)
        assert _roundtrip(guest, paths[bus], f"hot-{bus}") == f"hot-{bus}"
    assert len(set(paths.values())) == len(HOTPLUG_BUSES)
    if "hp_vhost_user_blk" in guest.backends:
        assert guest.backends["hp_vhost_user_blk"].check() is None  # backend thread healthy

    for bus in HOTPLUG_BUSES:
        name = "hp_" + bus.replace("-", "_")
        guest.unplug(name)
        assert name not in _peripherals(guest)
        assert paths[bus].removeprefix("/dev/") not in guest.block_devices()
        assert name not in guest.backends
    assert set(guest.block_devices()) == before
    deleted = {e["data"].get("device") for e in guest.machine.events
               if e.get("event") == "DEVICE_DELETED"}
    assert {"hp_" + b.replace("-", "_") for b in HOTPLUG_BUSES} <= deleted


def test_replug_same_name_and_refusals(guest: Guest) -> None:
    """A name can be reused after unplug; duplicates and emulated buses are refused."""
    first = guest.hotplug(Disk(name="again", bus="virtio-blk", size="8M"))
    with pytest.raises(ConfigError, match="already attached"):
        guest.hotplug(Disk(name="again", bus="virtio-blk"))
    guest.unplug("again")
    second = guest.hotplug(Disk(name="again", bus="virtio-blk", size="8M"))
    assert second == first  # the guest reuses the freed vdX name
    assert _roundtrip(guest, second, "second-life") == "second-life"
    guest.unplug("again")
    with pytest.raises(ConfigError, match="cannot be hot-plugged"):
        guest.hotplug(Disk(name="sata1", bus="ahci"))
    assert "sata1" not in _peripherals(guest)
    with pytest.raises(ConfigError, match="no data disk named"):
        guest.unplug("ghost")
