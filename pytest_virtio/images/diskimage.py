"""A whole bootable disk from a root directory, built offline: no loop device, no mount.

What a cloud image is: a GPT disk with a BIOS boot partition, an EFI system
partition and the root, and a bootloader for each firmware. Every step works on a
plain sparse file:

1. the table: ``sgdisk`` (:func:`sgdisk_argv`);
2. the ESP: ``mkfs.fat --offset`` in place, GRUB's UEFI image copied in with mtools
   (``-i disk@@offset``) as the removable-media path ``EFI/BOOT/BOOTX64.EFI``, which
   OVMF boots with empty variables;
3. the root: ``mke2fs -d rootdir -E offset=`` in place;
4. the BIOS path: GRUB's i386-pc core image in the BIOS boot partition and GRUB's
   ``boot.img`` in the MBR, both patched as ``grub-bios-setup`` patches them
   (GRUB's ``util/setup.c``): :func:`boot_sector`, :func:`embedded_core`.

Both GRUB cores carry the same early config (:func:`early_config`): find the root
by its filesystem UUID and read ``/boot/grub/grub.cfg`` there (:func:`grub_config`),
an ordinary file of the image that boots ``/vmlinuz`` and ``/initrd.img``, the
links the kernel package keeps pointing at the newest kernel and initramfs; so an
``update-initramfs`` in the guest is what the next boot loads, as on any Debian.

The layout is pure data (:func:`plan_layout`), its UUIDs derived from a seed (the
recipe's key) so that one recipe always makes the same layout.
"""

from __future__ import annotations

import os
import struct
import textwrap
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pytest_virtio.errors import ImageError
from pytest_virtio.tools import require_tool

__all__ = [
    "GRUB_BANNER", "GRUB_DIRS", "KERNEL_ARGS", "Layout", "Partition", "Step", "assemble",
    "boot_sector", "configure_root", "early_config", "embedded_core", "export_qcow2", "fstab",
    "grub_config", "grub_mkimage_argv", "install_bios_boot", "mke2fs_argv", "mkfs_fat_argv",
    "mtools_target", "plan_layout", "sgdisk_argv",
]

SECTOR = 512
MIB = 1 << 20
#: Partitions start and end on MiB boundaries, as every partitioning tool aligns them.
ALIGN = MIB // SECTOR
#: GPT partition type GUIDs (UEFI spec; the root one from the Discoverable
#: Partitions Specification, so systemd's gpt-auto generator knows it too).
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
ESP_SIZE = 64 * MIB
BIOS_BOOT_SIZE = 1 * MIB
ROOT_LABEL = "root"
#: The GRUB module trees: where grub-mkimage finds each platform's modules, and the
#: Debian package that ships them.
GRUB_DIRS = {"i386-pc": ("/usr/lib/grub/i386-pc", "grub-pc-bin"),
             "x86_64-efi": ("/usr/lib/grub/x86_64-efi", "grub-efi-amd64-bin")}
#: Modules built into both cores: no module is ever loaded from the disk (the image
#: has no /boot/grub/<platform>/), so all that grub.cfg uses is here.
GRUB_MODULES = ("part_gpt", "part_msdos", "ext2", "fat", "search", "search_fs_uuid",
                "search_label", "configfile", "normal", "linux", "echo", "serial", "terminal",
                "test", "gzio", "boot", "ls", "cat")
GRUB_PLATFORM_MODULES = {"i386-pc": ("biosdisk",), "x86_64-efi": ("efi_gop",)}
#: The kernel's arguments besides root=: the kernel and systemd on the first serial
#: port as on a cloud's instance, and the screen too.
KERNEL_ARGS = ("ro", "console=tty0", "console=ttyS0,115200")
#: The line GRUB prints before it loads Linux (``${grub_platform}`` is ``pc`` under
#: SeaBIOS, ``efi`` under OVMF): how a console watcher sees that the bootloader ran.
GRUB_BANNER = "pytest-virtio: GRUB (${grub_platform}) loading /vmlinuz"

# GRUB's i386-pc boot sector and core image (include/grub/i386/pc/boot.h, util/setup.c).
BPB_START, BPB_END = 0x03, 0x5A
KERNEL_SECTOR = 0x5C
BOOT_DRIVE = 0x64
DRIVE_CHECK = 0x66
WINDOWS_NT_MAGIC, PART_END = 0x1B8, 0x1FE
#: One blocklist entry: start sector (u64), sector count (u16), load segment (u16);
#: the first lies in the last 12 bytes of the core's first sector (diskboot.img).
BLOCKLIST = struct.Struct("<QHH")
#: Where diskboot.img loads the sectors after the first: GRUB_BOOT_I386_PC_KERNEL_SEG
#: (0x800) plus one sector in paragraphs, as setup.c's current_segment starts.
CORE_LOAD_SEGMENT = 0x800 + (SECTOR >> 4)
#: The largest core diskboot.img can load below 0x78000 (setup.c's maxsec; the
#: kernel links at 0x9000).
CORE_MAX = 0x78000 - 0x9000

#: Runs one build step (argv) and names it ("step 2/5 ESP"); raises on failure.
Step = Callable[[list[str], str], None]


@dataclass(frozen=True, slots=True)
class Partition:
    number: int
    name: str
    type_guid: str
    guid: str
    #: First sector and length in sectors.
    start: int
    sectors: int

    @property
    def offset(self) -> int:
        return self.start * SECTOR

    @property
    def size(self) -> int:
        return self.sectors * SECTOR


@dataclass(frozen=True, slots=True)
class Layout:
    """A disk's partitions and the identifiers the bootloader and fstab find them by."""

    disk_guid: str
    #: The disk's size in bytes (the last MiB holds the backup GPT).
    size: int
    bios: Partition
    esp: Partition
    root: Partition
    #: The root filesystem's UUID (root=UUID=..., GRUB's search) and the ESP's FAT
    #: volume id (8 hex digits; Linux shows it as XXXX-XXXX).
    root_uuid: str
    esp_serial: str

    @property
    def partitions(self) -> tuple[Partition, ...]:
        return (self.bios, self.esp, self.root)

    def describe(self) -> dict[str, object]:
        """The layout as plain data (the image's manifest keeps it)."""
        return {
            "disk_guid": self.disk_guid, "size": self.size, "root_uuid": self.root_uuid,
            "esp_uuid": f"{self.esp_serial[:4]}-{self.esp_serial[4:]}",
            "partitions": [{"number": p.number, "name": p.name, "type": p.type_guid,
                            "guid": p.guid, "start": p.start, "sectors": p.sectors}
                           for p in self.partitions],
        }


def _mib_sectors(size: int, what: str) -> int:
    if size <= 0:
        raise ImageError(f"the {what} size must be positive, got {size} bytes")
    return -(-size // MIB) * ALIGN


def plan_layout(root_size: int, seed: str, esp_size: int = ESP_SIZE,
                bios_size: int = BIOS_BOOT_SIZE) -> Layout:
    """BIOS boot, ESP and root from the first MiB on, each rounded up to whole MiB.

    Partition and filesystem identifiers are UUIDv5 of ``seed``: the same recipe
    always gets the same layout, two recipes different ones.
    """
    def ident(what: str) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"pytest-virtio:{seed}:{what}")

    start = ALIGN
    parts = []
    for number, (name, type_guid, size) in enumerate(
            (("bios", BIOS_BOOT_TYPE, bios_size), ("esp", ESP_TYPE, esp_size),
             ("root", ROOT_X86_64_TYPE, root_size)), start=1):
        sectors = _mib_sectors(size, name)
        parts.append(Partition(number, name, type_guid, str(ident(name)).upper(), start,
                               sectors))
        start += sectors
    bios, esp, root = parts
    return Layout(disk_guid=str(ident("disk")).upper(), size=(start + ALIGN) * SECTOR,
                  bios=bios, esp=esp, root=root, root_uuid=str(ident("rootfs")),
                  esp_serial=ident("esp-fat").hex[:8].upper())


# -- the table, the ESP, the root: argv of host tools --------------------------------

def sgdisk_argv(layout: Layout, disk: Path) -> list[str]:
    """A fresh GPT (and protective MBR) with the layout's partitions and GUIDs."""
    argv = [require_tool("sgdisk", "gdisk", "it writes the disk image's GPT"),
            "--clear", f"--disk-guid={layout.disk_guid}"]
    for p in layout.partitions:
        argv += [f"--new={p.number}:{p.start}:{p.start + p.sectors - 1}",
                 f"--typecode={p.number}:{p.type_guid}",
                 f"--partition-guid={p.number}:{p.guid}",
                 f"--change-name={p.number}:{p.name}"]
    return [*argv, str(disk)]


def mkfs_fat_argv(layout: Layout, disk: Path) -> list[str]:
    """FAT32 (as the UEFI spec wants an ESP) written at the ESP's sector, in place.

    One sector per cluster: mkfs.fat would size clusters by the whole file, not the
    partition (on a 1.6 GiB disk, 4 KiB clusters: too few for FAT32 in 64 MiB, which
    mtools then refuses to read).
    """
    esp = layout.esp
    return [require_tool("mkfs.fat", "dosfstools", "it makes the disk image's ESP"),
            f"--offset={esp.start}", "-F", "32", "-s", "1", "-n", "ESP", "-i", layout.esp_serial,
            str(disk), str(esp.size // 1024)]


def mtools_target(layout: Layout, disk: Path) -> str:
    """mtools' name for the ESP inside the disk file (``-i file@@byte-offset``)."""
    return f"{disk}@@{layout.esp.offset}"


def mke2fs_argv(layout: Layout, disk: Path, rootdir: Path) -> list[str]:
    """ext4 of ``rootdir``'s tree written at the root partition's offset, in place.

    ``nodiscard``: the range is a hole of a fresh file already, and a discard on a
    file is a hole punch that must not be trusted to stay inside the offset.
    """
    root = layout.root
    return [require_tool("mke2fs", "e2fsprogs", "it makes the disk image's root"),
            "-q", "-t", "ext4", "-L", ROOT_LABEL, "-U", layout.root_uuid, "-d", str(rootdir),
            "-E", f"offset={root.offset},nodiscard", "-F", str(disk), f"{root.size // 1024}k"]


def grub_mkimage_argv(platform: str, out: Path, config: Path) -> list[str]:
    """A GRUB core for ``platform`` (``i386-pc``, ``x86_64-efi``) with ``config`` embedded."""
    tree, package = GRUB_DIRS[platform]
    if not Path(tree, "moddep.lst").is_file():
        raise ImageError(f"GRUB's {platform} modules are not in {tree}: install them with: "
                         f"apt-get install {package}")
    return [require_tool("grub-mkimage", "grub-common", "it makes the disk image's bootloader"),
            "-O", platform, "-d", tree, "-o", str(out), "-c", str(config), "-p", "/boot/grub",
            *GRUB_MODULES, *GRUB_PLATFORM_MODULES[platform]]


# -- GRUB's configuration and the root's own files -----------------------------------

#: GRUB on the serial port under a BIOS; under UEFI the firmware's console is already
#: the serial port and the screen (OVMF), so GRUB writes there once.
_SERIAL_TERMINAL = ("serial --unit=0 --speed=115200\n"
                    "terminal_input console serial\n"
                    "terminal_output console serial\n")


def early_config(layout: Layout, platform: str) -> str:
    """Built into ``platform``'s core: its terminals first (so a root GRUB cannot find
    says so on the serial port: ``error: no such device: <uuid>``), the root by UUID,
    then the root's own grub.cfg. Plain commands only: GRUB runs this before its
    ``normal`` parser, which has no ``if``."""
    terminals = _SERIAL_TERMINAL if platform == "i386-pc" else ""
    return (f"{terminals}search --no-floppy --fs-uuid --set=root {layout.root_uuid}\n"
            "set prefix=($root)/boot/grub\n"
            "configfile $prefix/grub.cfg\n")


def grub_config(layout: Layout, title: str) -> str:
    """``/boot/grub/grub.cfg`` of the image: serial and screen, no menu wait, one entry."""
    args = " ".join((f"root=UUID={layout.root_uuid}", *KERNEL_ARGS))
    return (
        "# Written by pytest-virtio's image build (pytest_virtio/images/diskimage.py).\n"
        "# GRUB finds this file by the root's UUID; edit it as any grub.cfg.\n"
        'if [ "$grub_platform" = pc ]; then\n'
        f"{textwrap.indent(_SERIAL_TERMINAL, '    ')}"
        "fi\n"
        "set default=0\n"
        "set timeout=0\n"
        f"menuentry '{title}' {{\n"
        f'    echo "{GRUB_BANNER}"\n'
        f"    linux /vmlinuz {args}\n"
        "    initrd /initrd.img\n"
        "}\n"
    )


def fstab(layout: Layout) -> str:
    """The root (remounted rw by systemd, checked at boot) and the ESP, if it mounts."""
    esp = f"{layout.esp_serial[:4]}-{layout.esp_serial[4:]}"
    return (f"UUID={layout.root_uuid} / ext4 errors=remount-ro 0 1\n"
            f"UUID={esp} /boot/efi vfat umask=0077,nofail 0 0\n")


def configure_root(rootdir: Path, layout: Layout, title: str,
                   extra: dict[str, str] | None = None) -> None:
    """Write the layout's files into the root tree: fstab, grub.cfg, the ESP's mount
    point, and ``extra`` (guest path → text). The kernel's links must be there."""
    for link in ("vmlinuz", "initrd.img"):
        if not (rootdir / link).exists():
            raise ImageError(f"the root tree {rootdir} has no /{link} (the kernel package "
                             f"makes it): is initramfs-tools among the packages?")
    files = {"etc/fstab": fstab(layout), "boot/grub/grub.cfg": grub_config(layout, title),
             **{path.lstrip("/"): text for path, text in (extra or {}).items()}}
    for path, text in files.items():
        dest = rootdir / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
    (rootdir / "boot" / "efi").mkdir(parents=True, exist_ok=True)


# -- the BIOS path: GRUB's boot sector and core image, as grub-bios-setup writes them --

def boot_sector(boot_img: bytes, mbr: bytes, core_sector: int) -> bytes:
    """GRUB's ``boot.img`` made the disk's MBR (``util/setup.c``): the disk's own BPB
    area and partition table kept (here the protective MBR's), the jump over the
    boot-drive check replaced by two NOPs (a hard disk: trust DL only if it has bit 7),
    the boot drive 0xff (the one the BIOS passes), the core's first sector at 0x5c."""
    for what, data in (("boot.img", boot_img), ("the disk's first sector", mbr)):
        if len(data) != SECTOR or data[510:] != b"\x55\xaa":
            raise ImageError(f"{what} is not a 512-byte boot sector ending in 55 aa")
    out = bytearray(boot_img)
    out[BPB_START:BPB_END] = mbr[BPB_START:BPB_END]
    out[WINDOWS_NT_MAGIC:PART_END] = mbr[WINDOWS_NT_MAGIC:PART_END]
    out[DRIVE_CHECK:DRIVE_CHECK + 2] = b"\x90\x90"
    out[BOOT_DRIVE] = 0xFF
    struct.pack_into("<Q", out, KERNEL_SECTOR, core_sector)
    return bytes(out)


def embedded_core(core: bytes, core_sector: int) -> bytes:
    """The i386-pc core as it lies from ``core_sector`` on: whole sectors, its first
    blocklist naming the sectors after the first (contiguous behind it), the entry
    before it a terminator, as setup.c's embedding leaves them."""
    if len(core) < 2 * SECTOR:
        raise ImageError(f"the GRUB core image is {len(core)} bytes: not a core image")
    if len(core) > CORE_MAX:
        raise ImageError(f"the GRUB core image is {len(core)} bytes, more than the "
                         f"{CORE_MAX} diskboot.img can load: drop modules")
    sectors = -(-len(core) // SECTOR)
    out = bytearray(core.ljust(sectors * SECTOR, b"\0"))
    first = SECTOR - BLOCKLIST.size
    _, length, _ = BLOCKLIST.unpack_from(out, first - BLOCKLIST.size)
    if length:
        raise ImageError("the GRUB core image has more than one blocklist already: "
                         "not a grub-mkimage i386-pc core")
    BLOCKLIST.pack_into(out, first, core_sector + 1, sectors - 1, CORE_LOAD_SEGMENT)
    BLOCKLIST.pack_into(out, first - BLOCKLIST.size, 0, 0, 0)
    return bytes(out)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def install_bios_boot(disk: Path, layout: Layout, core: bytes, boot_img: bytes) -> None:
    """Core into the BIOS boot partition, then the MBR's code around the table."""
    placed = embedded_core(core, layout.bios.start)
    if len(placed) > layout.bios.size:
        raise ImageError(f"the GRUB core image ({len(placed)} bytes) does not fit the "
                         f"{layout.bios.size}-byte BIOS boot partition")
    fd = os.open(disk, os.O_RDWR | os.O_CLOEXEC)
    try:
        mbr = os.pread(fd, SECTOR, 0)
        _pwrite_all(fd, placed, layout.bios.offset)
        _pwrite_all(fd, boot_sector(boot_img, mbr, layout.bios.start), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the whole disk ------------------------------------------------------------------

def _create_sparse(disk: Path, size: int) -> None:
    with disk.open("wb") as f:
        f.truncate(size)


def _grub_core(platform: str, out: Path, layout: Layout, step: Step, what: str) -> None:
    config = out.with_name(f"early-{platform}.cfg")
    config.write_text(early_config(layout, platform))
    step(grub_mkimage_argv(platform, out, config), what)


def _make_esp(disk: Path, layout: Layout, work: Path, step: Step) -> None:
    efi = work / "BOOTX64.EFI"
    _grub_core("x86_64-efi", efi, layout, step, "GRUB for UEFI")
    step(mkfs_fat_argv(layout, disk), "ESP mkfs.fat")
    target = mtools_target(layout, disk)
    mtools = "it fills the disk image's ESP"
    step([require_tool("mmd", "mtools", mtools), "-i", target, "::/EFI", "::/EFI/BOOT"],
         "ESP mmd")
    step([require_tool("mcopy", "mtools", mtools), "-i", target, str(efi),
          "::/EFI/BOOT/BOOTX64.EFI"], "ESP mcopy")


def _make_bios_boot(disk: Path, layout: Layout, work: Path, step: Step) -> None:
    core = work / "core.img"
    _grub_core("i386-pc", core, layout, step, "GRUB for BIOS")
    boot_img = Path(GRUB_DIRS["i386-pc"][0], "boot.img").read_bytes()
    install_bios_boot(disk, layout, core.read_bytes(), boot_img)


def assemble(disk: Path, layout: Layout, rootdir: Path, work: Path, step: Step) -> None:
    """The raw disk at ``disk`` from ``rootdir`` (already :func:`configure_root`-ed);
    ``work`` holds the GRUB images meanwhile."""
    work.mkdir(parents=True, exist_ok=True)
    _create_sparse(disk, layout.size)
    step(sgdisk_argv(layout, disk), "GPT")
    _make_esp(disk, layout, work, step)
    step(mke2fs_argv(layout, disk, rootdir), "root mke2fs")
    _make_bios_boot(disk, layout, work, step)


def export_qcow2(raw: Path, out: Path, step: Step) -> None:
    """The raw disk as qcow2 (holes stay unallocated), what guests boot through overlays."""
    step([require_tool("qemu-img", "qemu-utils", "it exports the disk image"), "convert",
          "-f", "raw", "-O", "qcow2", str(raw), str(out)], "qcow2")
