"""Issue 23's small API gaps, without QEMU: serial limits per bus, block sizes on
every bus QEMU takes them, one disk grammar for markers and ``guest.hotplug``,
and the resize helpers' checks and QMP arguments.

The guest-visible side of each is in tests/integration/test_api_gaps.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from pytest_virtio.errors import ConfigError
from pytest_virtio.guests import storage
from pytest_virtio.guests.guest import Guest
from pytest_virtio.spec import DISK_BUSES, Disk, MachineSpec, apply_matrix, spec_from_kwargs
from pytest_virtio.spec.argv import frontend_props
from pytest_virtio.spec.catalogue import (
    LOGICAL_BLOCK_SIZES_BY_BUS,
    PHYSICAL_BLOCK_SIZE_BUSES,
    SERIAL_LIMITS,
)
from pytest_virtio.spec.parse import disk_from


def _message(fn: Any) -> str:
    with pytest.raises(ConfigError) as info:
        fn()
    return str(info.value)


# --------------------------------------------------------------------------- serials


def test_every_bus_has_a_serial_limit() -> None:
    assert set(SERIAL_LIMITS) == set(DISK_BUSES)


@pytest.mark.parametrize("bus", ["virtio-scsi", "lsi"])
def test_scsi_takes_a_36_character_serial(bus: str) -> None:
    serial = "S" * 36
    assert Disk(bus=bus, serial=serial).serial == serial
    assert ("serial", serial) in frontend_props(Disk(bus=bus, serial=serial), bus)
    msg = _message(lambda: Disk(name="d", bus=bus, serial="S" * 37))
    assert f"disk 'd' (bus '{bus}')" in msg and "37 characters" in msg and "holds 36" in msg


@pytest.mark.parametrize("bus", ["virtio-blk", "vhost-user-blk", "ide", "ahci", "nvme"])
def test_twenty_character_buses_name_their_limit_and_where_more_fits(bus: str) -> None:
    assert Disk(bus=bus, serial="S" * 20).serial == "S" * 20
    msg = _message(lambda: Disk(name="d", bus=bus, serial="S" * 21))
    assert f"bus '{bus}' holds 20" in msg
    assert "'virtio-scsi'" in msg and "36" in msg


def test_a_long_name_is_a_serial_only_where_it_fits() -> None:
    name = "a_rather_long_disk_name_25"
    assert Disk(name=name, bus="virtio-scsi").name == name
    msg = _message(lambda: Disk(name=name, bus="virtio-blk"))
    assert "holds 20 characters on bus 'virtio-blk'" in msg and "serial=" in msg


def test_serial_characters_still_checked() -> None:
    assert "letters, digits" in _message(lambda: Disk(bus="virtio-scsi", serial="has,comma"))
    assert "letters, digits" in _message(lambda: Disk(bus="virtio-scsi", serial=""))


# --------------------------------------------------------------------------- block sizes


@pytest.mark.parametrize("bus", ["virtio-blk", "virtio-scsi", "lsi", "nvme"])
def test_block_sizes_on_virtio_and_scsi_and_nvme(bus: str) -> None:
    disk = Disk(bus=bus, logical_block_size=4096, physical_block_size=4096)
    props = dict(frontend_props(disk, bus))
    assert props["logical_block_size"] == 4096 and props["physical_block_size"] == 4096


def test_physical_block_follows_the_logical_one() -> None:
    """QEMU refuses logical 4096 with its default physical 512: the argv never asks it to."""
    props = dict(frontend_props(Disk(bus="virtio-blk", logical_block_size=2048), "virtio-blk"))
    assert props == {"serial": "disk0", "logical_block_size": 2048, "physical_block_size": 2048}
    alone = dict(frontend_props(Disk(bus="virtio-blk", physical_block_size=4096), "virtio-blk"))
    assert "logical_block_size" not in alone and alone["physical_block_size"] == 4096


@pytest.mark.parametrize("bus", ["ide", "ahci"])
def test_ide_takes_a_physical_block_but_only_512_logical(bus: str) -> None:
    assert Disk(bus=bus, physical_block_size=4096).physical_block_size == 4096
    msg = _message(lambda: Disk(bus=bus, logical_block_size=4096))
    assert "logical_block_size must be one of '512', got 4096" in msg


def test_block_size_refusals_name_disk_bus_and_fix() -> None:
    msg = _message(lambda: Disk(name="d", bus="virtio-blk", logical_block_size=4096,
                                physical_block_size=512))
    assert "disk 'd' (bus 'virtio-blk')" in msg and "smaller than" in msg and "4096" in msg
    assert "power of two" in _message(lambda: Disk(bus="virtio-blk", physical_block_size=3000))
    assert "2 MiB" in _message(lambda: Disk(bus="nvme", physical_block_size=4 << 20))
    assert "physical_block_size" in _message(
        lambda: Disk(bus="virtio-blk", physical_block_size=True))  # type: ignore[arg-type]
    assert "'virtio-blk', 'virtio-scsi'" in _message(
        lambda: Disk(bus="vhost-user-blk", physical_block_size=4096))
    assert "'512', '1024', '2048', '4096'" in _message(
        lambda: Disk(bus="virtio-scsi", logical_block_size=8192))


def test_vhost_user_blk_keeps_its_served_block_size() -> None:
    disk = Disk(bus="vhost-user-blk", logical_block_size=4096)
    assert frontend_props(disk, "vhost-user-blk") == []  # the backend serves blk_size
    assert "in-process" in _message(
        lambda: Disk(external_socket="/x.sock", logical_block_size=4096))


def test_block_sizes_are_marker_keys() -> None:
    spec = spec_from_kwargs({"disks": [{"bus": "virtio-scsi", "logical_block_size": 4096}]})
    assert spec.disks[0].logical_block_size == 4096


def test_matrix_keeps_block_sizes_where_the_bus_takes_them() -> None:
    base = MachineSpec(disks=(Disk(bus="virtio-blk", logical_block_size=4096,
                                   physical_block_size=8192),))
    scsi = apply_matrix(base, {"disk": "virtio-scsi"}).disks[0]
    assert (scsi.logical_block_size, scsi.physical_block_size) == (4096, 8192)
    ide = apply_matrix(base, {"disk": "ide"}).disks[0]
    assert (ide.logical_block_size, ide.physical_block_size) == (None, 8192)
    vhost = apply_matrix(base, {"disk": "vhost-user-blk"}).disks[0]
    assert (vhost.logical_block_size, vhost.physical_block_size) == (4096, None)
    assert set(LOGICAL_BLOCK_SIZES_BY_BUS) == set(DISK_BUSES)
    assert set(PHYSICAL_BLOCK_SIZE_BUSES) == set(DISK_BUSES) - {"vhost-user-blk"}


# --------------------------------------------------------------------------- one disk grammar


def test_disk_from_takes_what_a_marker_item_takes() -> None:
    item = {"name": "hot", "bus": "virtio-scsi", "size": "8M", "serial": "S" * 36}
    marked = spec_from_kwargs({"disks": [item]}).disks[0]
    assert disk_from(item, "guest.hotplug(disk)", "disk3") == marked
    assert disk_from("virtio-blk", "guest.hotplug(disk)", "disk3") == Disk(name="disk3",
                                                                          bus="virtio-blk")
    assert disk_from({"bus": "nvme"}, "here", "disk7").name == "disk7"
    assert disk_from(marked, "here", "unused") is marked


@pytest.mark.parametrize("item", [
    {"bus": "virtio-blk", "sise": "8M"},
    {"bus": "virtio-blk", "serial": "S" * 21},
    {"bus": "virtio-blk", "logical_block_size": 4096, "physical_block_size": 512},
    "floppy",
    42,
])
def test_disk_from_errors_are_the_markers(item: Any) -> None:
    """Same text after the prefix: one grammar, one set of messages."""
    hot = _message(lambda: disk_from(item, "guest.hotplug(disk)", "disk0"))
    marker = _message(lambda: spec_from_kwargs({"disks": [item]}))
    assert hot.startswith("guest.hotplug(disk)")
    assert marker.startswith("@pytest.mark.vm: disks[0]") or marker.startswith(
        "@pytest.mark.vm: disk 'disk0'")
    tail = hot.removeprefix("guest.hotplug(disk)").lstrip(": ")
    assert marker.endswith(tail), (hot, marker)


def test_guest_hotplug_parses_a_dict_before_touching_qemu(tmp_path: Path) -> None:
    """The dict's error is the marker's, raised before any QMP (there is no QEMU here)."""
    guest = Guest(machine=cast(Any, None), name="g", accel="tcg", timeout_scale=1.0,
                  run_dir=tmp_path, spec=MachineSpec())
    msg = _message(lambda: guest.hotplug({"bus": "virtio-blk", "sise": "8M"}))
    assert msg.startswith("guest.hotplug(disk): unknown key 'sise' (allowed: 'name'")


# --------------------------------------------------------------------------- resize


def test_resize_size_uses_the_size_grammar_and_the_block() -> None:
    disk = Disk(name="d", bus="virtio-blk")
    assert storage.new_size(disk, "1.5M", "w") == 3 << 19
    assert storage.new_size(disk, 1 << 30, "w") == 1 << 30
    msg = _message(lambda: storage.new_size(Disk(name="d", bus="virtio-scsi",
                                                 logical_block_size=4096), "6K", "w"))
    assert "4096-byte blocks" in msg
    assert "positive" in _message(lambda: storage.new_size(disk, 0, "w"))


@pytest.mark.parametrize("bus", ["vhost-user-blk", "ide", "ahci", "nvme"])
def test_resize_refused_where_it_cannot_work_saying_why(bus: str) -> None:
    msg = _message(lambda: storage.new_size(Disk(name="d", bus=bus), "1G", "w"))
    assert msg.startswith(f"w: disk 'd' is on bus '{bus}', which cannot be resized: ")
    assert storage.RESIZE_REFUSED[bus] in msg and "'virtio-blk', 'virtio-scsi', 'lsi'" in msg


def test_block_resize_names_our_node_both_ways() -> None:
    """-drive id= is a BlockBackend (QMP device), blockdev-add's a node-name: drv-<disk> both."""
    args = storage.block_resize_args(Disk(name="data"), 1 << 20)
    assert args == {"device": "drv-data", "node-name": "drv-data", "size": 1 << 20}


def test_rescan_only_where_the_guest_is_not_told() -> None:
    assert storage.rescan_command(Disk(bus="virtio-blk"), "vdb") is None
    assert storage.rescan_command(Disk(bus="virtio-scsi"), "sda") is None
    assert storage.rescan_command(Disk(bus="lsi"), "sdb") == "echo 1 > /sys/block/sdb/device/rescan"
