"""A bootable disk assembled offline: the layout (pure), GRUB's BIOS patches (pure), and a
small disk really assembled with the host's tools and read back by sfdisk, e2fsck, mtools
and GRUB's own filesystem code (grub-fstest). No QEMU: the boot is
tests/integration/test_bootable_image.py."""

from __future__ import annotations

import itertools
import json
import struct
import subprocess
from pathlib import Path

import pytest

from pytest_virtio.errors import ImageError
from pytest_virtio.images import builder, diskimage
from pytest_virtio.images.diskimage import (
    ALIGN,
    BLOCKLIST,
    MIB,
    SECTOR,
    Layout,
    boot_sector,
    embedded_core,
    plan_layout,
)
from pytest_virtio.images.recipe import load_recipe

#: The backup GPT: 32 sectors of entries and the header, at the disk's end.
BACKUP_GPT_SECTORS = 33


def test_layout_is_aligned_contiguous_and_leaves_room_for_the_backup_gpt() -> None:
    layout = plan_layout(1536 * MIB, "bookworm-cloud-0123")
    parts = layout.partitions
    assert [(p.number, p.name) for p in parts] == [(1, "bios"), (2, "esp"), (3, "root")]
    assert parts[0].start == ALIGN  # the first MiB: protective MBR, GPT header and entries
    for before, after in itertools.pairwise(parts):
        assert after.start == before.start + before.sectors
    assert all(p.start % ALIGN == 0 and p.sectors % ALIGN == 0 for p in parts)
    assert (layout.bios.size, layout.esp.size, layout.root.size) == (MIB, 64 * MIB, 1536 * MIB)
    end = layout.root.start + layout.root.sectors
    assert layout.size // SECTOR - end >= BACKUP_GPT_SECTORS
    assert layout.size % MIB == 0


def test_layout_sizes_round_up_to_whole_mib() -> None:
    layout = plan_layout(10 * MIB + 1, "s", esp_size=33 * MIB - 512)
    assert (layout.root.size, layout.esp.size) == (11 * MIB, 33 * MIB)
    with pytest.raises(ImageError, match="root size must be positive"):
        plan_layout(0, "s")


def test_layout_ids_follow_the_seed() -> None:
    one, again, other = plan_layout(MIB, "a"), plan_layout(MIB, "a"), plan_layout(MIB, "b")
    assert one == again
    ids = lambda lay: {lay.disk_guid, lay.root_uuid, lay.esp_serial,  # noqa: E731
                       *(p.guid for p in lay.partitions)}
    assert len(ids(one)) == 6 and not ids(one) & ids(other)
    assert len(one.esp_serial) == 8 and int(one.esp_serial, 16) >= 0


def test_grub_finds_the_root_by_uuid_and_boots_the_kernel_links() -> None:
    layout = plan_layout(MIB, "s")
    early = diskimage.early_config(layout, "i386-pc")
    assert early.startswith("serial --unit=0 --speed=115200\n")  # a failure shows there
    assert f"search --no-floppy --fs-uuid --set=root {layout.root_uuid}" in early
    assert "configfile $prefix/grub.cfg" in early
    assert "serial" not in diskimage.early_config(layout, "x86_64-efi")  # OVMF's console
    assert not {"if", "fi"} & {line.split()[0] for line in early.splitlines()}
    cfg = diskimage.grub_config(layout, "Debian")
    assert f"linux /vmlinuz root=UUID={layout.root_uuid} ro console=tty0 " \
           "console=ttyS0,115200\n" in cfg
    assert "initrd /initrd.img\n" in cfg and diskimage.GRUB_BANNER in cfg
    subprocess.run(["grub-script-check"], input=cfg + early, text=True, check=True)
    esp = f"{layout.esp_serial[:4]}-{layout.esp_serial[4:]}"
    assert diskimage.fstab(layout).splitlines() == [
        f"UUID={layout.root_uuid} / ext4 errors=remount-ro 0 1",
        f"UUID={esp} /boot/efi vfat umask=0077,nofail 0 0"]


def _sector(fill: int) -> bytes:
    return bytes([fill]) * 510 + b"\x55\xaa"


def test_boot_sector_keeps_the_disks_table_and_names_the_core() -> None:
    boot, mbr = _sector(0xB0), _sector(0x3C)
    out = boot_sector(boot, mbr, 2048)
    assert out[:3] == boot[:3]  # the jump over the BPB
    assert out[0x03:0x5A] == mbr[0x03:0x5A]  # the disk's BPB area
    assert out[0x1B8:0x1FE] == mbr[0x1B8:0x1FE]  # disk signature and partition table
    assert struct.unpack_from("<Q", out, 0x5C) == (2048,)
    assert out[0x64] == 0xFF and out[0x66:0x68] == b"\x90\x90"
    assert out[0x68:0x1B8] == boot[0x68:0x1B8] and out[510:] == b"\x55\xaa"
    with pytest.raises(ImageError, match="not a 512-byte boot sector"):
        boot_sector(boot[:511], mbr, 2048)


def test_embedded_core_lists_the_sectors_behind_its_first() -> None:
    core = bytearray(3 * SECTOR + 100)
    BLOCKLIST.pack_into(core, SECTOR - BLOCKLIST.size, 2, 0, 0x820)  # diskboot.img's default
    out = embedded_core(bytes(core), 2048)
    assert len(out) == 4 * SECTOR and out[len(core):] == bytes(len(out) - len(core))
    assert BLOCKLIST.unpack_from(out, SECTOR - BLOCKLIST.size) == (2049, 3, 0x820)
    assert BLOCKLIST.unpack_from(out, SECTOR - 2 * BLOCKLIST.size) == (0, 0, 0)
    with pytest.raises(ImageError, match=r"more than the \d+ diskboot.img can load"):
        embedded_core(bytes(diskimage.CORE_MAX + 1), 2048)
    BLOCKLIST.pack_into(core, SECTOR - 2 * BLOCKLIST.size, 9, 1, 0)
    with pytest.raises(ImageError, match="more than one blocklist"):
        embedded_core(bytes(core), 2048)


# -- a small disk, really assembled ----------------------------------------------------

def _step(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{what}: {argv}: {proc.stdout}{proc.stderr}"


def _out(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Layout, Path]:
    tmp = tmp_path_factory.mktemp("disk")
    root = tmp / "rootdir"
    (root / "boot").mkdir(parents=True)
    (root / "boot" / "vmlinuz-6.1.0-test").write_bytes(b"kernel")
    (root / "boot" / "initrd.img-6.1.0-test").write_bytes(b"initrd")
    (root / "vmlinuz").symlink_to("boot/vmlinuz-6.1.0-test")
    (root / "initrd.img").symlink_to("boot/initrd.img-6.1.0-test")
    layout = plan_layout(1536 * MIB, "unit-test")  # full size: sparse, costs nothing
    diskimage.configure_root(root, layout, "Test", extra={"/etc/cloud/x.cfg": "hello\n"})
    disk = tmp / "disk.raw"
    diskimage.assemble(disk, layout, root, tmp / "work", _step)
    return disk, layout, tmp / "work"


def test_the_table_reads_back_as_planned(small_disk: tuple[Path, Layout, Path]) -> None:
    disk, layout, _ = small_disk
    table = json.loads(_out("sfdisk", "--json", str(disk)))["partitiontable"]
    assert table["label"] == "gpt" and table["id"] == layout.disk_guid
    assert [(p["start"], p["size"], p["type"], p["uuid"], p["name"])
            for p in table["partitions"]] == [
        (p.start, p.sectors, p.type_guid, p.guid, p.name) for p in layout.partitions]
    assert disk.stat().st_size == layout.size
    assert disk.stat().st_blocks * 512 < layout.size // 2  # sparse: holes stay holes
    assert "No problems found" in _out("sgdisk", "--verify", str(disk))


def test_the_root_is_a_clean_ext4_grub_reads(small_disk: tuple[Path, Layout, Path]) -> None:
    disk, layout, _ = small_disk
    at = f"{disk}?offset={layout.root.offset}"
    _out("e2fsck", "-fn", at)
    assert layout.root_uuid in _out("dumpe2fs", "-h", at)
    cfg = diskimage.grub_config(layout, "Test")
    assert _out("debugfs", "-R", "cat /boot/grub/grub.cfg", at) == cfg
    assert _out("debugfs", "-R", "cat /etc/cloud/x.cfg", at) == "hello\n"
    # GRUB's own GPT and ext2 code on the host (loop0: its name for the file, no loop
    # device), what its cores will do at boot
    assert _out("grub-fstest", str(disk), "cat", "(loop0,gpt3)/boot/grub/grub.cfg") == cfg
    assert _out("grub-fstest", str(disk), "cat", "(loop0,gpt3)/vmlinuz") == "kernel"


def test_the_esp_holds_grubs_uefi_image(small_disk: tuple[Path, Layout, Path]) -> None:
    disk, layout, work = small_disk
    target = diskimage.mtools_target(layout, disk)
    assert f"Volume Serial Number is {layout.esp_serial[:4]}-{layout.esp_serial[4:]}" \
        in _out("mdir", "-i", target, "::/")
    copy = work / "copied.efi"
    _out("mcopy", "-n", "-i", target, "::/EFI/BOOT/BOOTX64.EFI", str(copy))
    assert copy.read_bytes() == (work / "BOOTX64.EFI").read_bytes()
    assert copy.read_bytes()[:2] == b"MZ"  # a PE image, as UEFI loads


def test_the_bios_path_chains_mbr_to_core(small_disk: tuple[Path, Layout, Path]) -> None:
    disk, layout, work = small_disk
    data = disk.read_bytes()
    mbr = data[:SECTOR]
    assert struct.unpack_from("<Q", mbr, 0x5C) == (layout.bios.start,)
    # the protective MBR's partition entry survived: type 0xEE from sector 1
    assert mbr[0x1BE + 4] == 0xEE and struct.unpack_from("<I", mbr, 0x1BE + 8) == (1,)
    core = (work / "core.img").read_bytes()
    placed = data[layout.bios.offset:layout.bios.offset + len(core)]
    assert placed == embedded_core(core, layout.bios.start)[:len(core)]
    start, length, _ = BLOCKLIST.unpack_from(placed, SECTOR - BLOCKLIST.size)
    assert (start, length) == (layout.bios.start + 1, -(-len(core) // SECTOR) - 1)


# -- the cache: a disk recipe is built and checked as a disk ---------------------------

def test_each_ensure_refuses_the_other_kind_of_recipe(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match='bookworm-cloud is boot = "firmware": a whole disk'):
        builder.ensure_image(load_recipe("bookworm-cloud"), tmp_path)
    with pytest.raises(ImageError, match="bookworm is boot = 'ours': QEMU boots its kernel"):
        builder.ensure_disk_image(load_recipe("bookworm"), tmp_path)
    assert not (tmp_path / "images").exists()  # refused before any lock or build


def test_a_cached_disk_is_checked_against_its_manifest(tmp_path: Path) -> None:
    layout = plan_layout(MIB, "s")
    (tmp_path / "disk.qcow2").write_bytes(b"QFI\xfb" + bytes(60))
    (tmp_path / "config-6.1.0-test").write_text("CONFIG_VIRTIO_BLK=m\n")
    manifest = {"key": "k", "disk": "disk.qcow2", "format": "qcow2", "disk_bytes": 64,
                "kernel_version": "6.1.0-test", "config": "config-6.1.0-test",
                "layout": layout.describe()}
    (tmp_path / builder.MANIFEST).write_text(json.dumps(manifest))
    disk = builder.verify_disk(tmp_path)
    assert (disk.path, disk.root_uuid, disk.root_partition, disk.format) == (
        tmp_path / "disk.qcow2", layout.root_uuid, 3, "qcow2")
    (tmp_path / "disk.qcow2").write_bytes(b"\0" * 64)
    with pytest.raises(ImageError, match=r"disk.qcow2 is not a qcow2 file; remove .* --force"):
        builder.verify_disk(tmp_path)
    (tmp_path / "disk.qcow2").write_bytes(b"QFI\xfb")
    with pytest.raises(ImageError, match="has the wrong size"):
        builder.verify_disk(tmp_path)
