"""Every disk bus and NIC model in the catalogue, in a real guest: the expected
driver binds and the data disk is found by its serial and holds data.

Two guests cover the whole catalogue (boots are the expensive part under TCG):
one all-virtio (virtio-blk root; virtio-blk, virtio-scsi and vhost-user-blk data
disks; virtio-net) and one all-emulated (IDE root; IDE, AHCI, LSI and NVMe data
disks; e1000, e1000e and rtl8139). Each device is still its own test id, so a
report says exactly which bus broke.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pytest_virtio.guests.guest import Guest
from pytest_virtio.plugin.fixtures import check_drivers
from pytest_virtio.spec import EXPECTED_DRIVER, Disk, MachineSpec, Nic

VIRTIO_BUSES = ("virtio-blk", "virtio-scsi", "vhost-user-blk")
EMULATED_BUSES = ("ide", "ahci", "lsi", "nvme")
VIRTIO_NICS = ("virtio-net",)
EMULATED_NICS = ("e1000", "e1000e", "rtl8139")


def _name(kind: str) -> str:
    """Disk/NIC name (and so disk serial) from a bus or model: 'virtio-blk' -> 'd_virtio_blk'."""
    return "d_" + kind.replace("-", "_")


def _spec(root_bus: str, buses: tuple[str, ...], nics: tuple[str, ...]) -> MachineSpec:
    disks = tuple(Disk(name=_name(b), bus=b, size="16M") for b in buses)
    # No SSH port forwards: these guests talk over the console only (faster boot).
    net = tuple(Nic(model=m, name=_name(m), hostfwd_ssh=False) for m in nics)
    return MachineSpec(root_bus=root_bus, disks=disks, nics=net)


@pytest.fixture(scope="module")
def virtio_guest(boot_shared: Callable[[MachineSpec, str], Guest]) -> Guest:
    return boot_shared(_spec("virtio-blk", VIRTIO_BUSES, VIRTIO_NICS), "virtio")


@pytest.fixture(scope="module")
def emulated_guest(boot_shared: Callable[[MachineSpec, str], Guest]) -> Guest:
    return boot_shared(_spec("ide", EMULATED_BUSES, EMULATED_NICS), "emulated")


def _guest_for(request: pytest.FixtureRequest, kind: str) -> Guest:
    virtio = kind in VIRTIO_BUSES or kind in VIRTIO_NICS
    guest: Guest = request.getfixturevalue("virtio_guest" if virtio else "emulated_guest")
    return guest


@pytest.mark.parametrize("bus", VIRTIO_BUSES + EMULATED_BUSES)
def test_disk_is_driven_by_expected_driver(request: pytest.FixtureRequest, bus: str) -> None:
    guest = _guest_for(request, bus)
    chain = guest.disk_drivers(_name(bus))
    assert EXPECTED_DRIVER[bus] in chain, (
        f"{bus} disk found by serial, but its sysfs path is driven by {chain}, "
        f"not {EXPECTED_DRIVER[bus]}"
    )


@pytest.mark.parametrize("bus", VIRTIO_BUSES + EMULATED_BUSES)
def test_disk_found_by_serial_holds_data(request: pytest.FixtureRequest, bus: str) -> None:
    guest = _guest_for(request, bus)
    dev = guest.disk_path(_name(bus))
    size = int(guest.check(f"blockdev --getsize64 {dev}").stdout)
    assert size == 16 << 20
    token = f"pv-{bus}-token"
    guest.check(f"printf '%s' {token} | dd of={dev} bs=4096 conv=sync oflag=direct 2>/dev/null")
    guest.check("echo 3 > /proc/sys/vm/drop_caches")
    read = f"dd if={dev} bs=4096 count=1 iflag=direct 2>/dev/null | head -c {len(token)}"
    back = guest.check(read)
    assert back.stdout == token


@pytest.mark.parametrize("model", VIRTIO_NICS + EMULATED_NICS)
def test_nic_is_driven_by_expected_driver(request: pytest.FixtureRequest, model: str) -> None:
    guest = _guest_for(request, model)
    chain = guest.nic_drivers(_name(model))
    assert chain[0] == EXPECTED_DRIVER[model], f"{model}: driver chain {chain}"
    iface = guest.nic_interface(_name(model))
    flags = guest.check(f"cat /sys/class/net/{iface}/flags").stdout
    assert int(flags, 16) & 0x1, f"{iface} ({model}) is not up"


def test_expect_drivers_sees_every_bound_driver(emulated_guest: Guest) -> None:
    """What @pytest.mark.expect_drivers checks: every emulated driver present, no virtio_net."""
    wanted = tuple(EXPECTED_DRIVER[k] for k in EMULATED_BUSES + EMULATED_NICS)
    check_drivers(emulated_guest, wanted, ("virtio_net", "virtio_scsi"))
