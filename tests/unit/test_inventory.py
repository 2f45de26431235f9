"""The guest sysfs parsers, on text as the guest's scripts print it."""

from __future__ import annotations

from pytest_virtio.channels.inventory import (
    Module,
    PciDevice,
    VirtioDevice,
    parse_block_devices,
    parse_modules,
    parse_pci_devices,
    parse_virtio_devices,
)


def test_virtio_devices_with_and_without_a_driver() -> None:
    out = "virtio0 0x0002 virtio_blk 0000:00:03.0\nvirtio1 0x0005 - virtio-mmio.0\n"
    assert parse_virtio_devices(out) == [
        VirtioDevice("virtio0", 2, "virtio_blk", "0000:00:03.0"),
        VirtioDevice("virtio1", 5, None, None),
    ]


def test_pci_devices() -> None:
    out = "0000:00:03.0 0x1af4 0x1042 0x010000 virtio-pci\n0000:00:01.1 0x8086 0x7010 0x010180 -\n"
    assert parse_pci_devices(out) == [
        PciDevice("0000:00:03.0", 0x1AF4, 0x1042, 0x010000, "virtio-pci"),
        PciDevice("0000:00:01.1", 0x8086, 0x7010, 0x010180, None),
    ]


def test_modules_loaded_and_builtin() -> None:
    out = ("virtio_blk 24576 2 - Live 0x0\nvirtio_ring 45056 3 virtio_blk,virtio_pci, Live 0x0\n"
           "--builtin--\nkernel/drivers/block/virtio-foo.ko\nkernel/fs/ext4/ext4.ko\n")
    mods = parse_modules(out)
    assert mods["virtio_blk"] == Module("virtio_blk", 24576, ())
    assert mods["virtio_ring"].used_by == ("virtio_blk", "virtio_pci")
    assert mods["virtio_foo"].builtin and mods["ext4"] == Module("ext4", 0, (), builtin=True)


def test_block_devices_serials() -> None:
    assert parse_block_devices("vda root\nsr0 \nnvme0n1 data1\n") == {
        "vda": "root", "sr0": "", "nvme0n1": "data1"}
