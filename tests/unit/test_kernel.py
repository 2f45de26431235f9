"""Your kernel alone: kernel files, modules layouts, the modules disk, drivers checked up front."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pytest_virtio.errors import ConfigError, MissingDriver
from pytest_virtio.guests.session import check_drivers, check_honoured
from pytest_virtio.guests.settings import Settings
from pytest_virtio.images.builder import GuestImage, extract_vmlinux, remove_unlocked
from pytest_virtio.images.initramfs import available_modules
from pytest_virtio.images.kernel import (
    bzimage_release,
    check_choice,
    elf_release,
    modules_source,
    stage_modules,
    stale_kernels,
)
from pytest_virtio.spec import LaunchContext, MachineSpec, spec_from_kwargs, to_argv

RELEASE = "6.1.0-99-test"
ELF = b"\x7fELF" + b"\x02\x01\x01" + b"\0" * 57 + b"Linux version " + RELEASE.encode() + b" (x)"


def _bzimage(payload: bytes, setup_sects: int = 4) -> bytes:
    """A minimal bzImage: setup header (boot.rst) with version string and payload."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    version = f"{RELEASE} (builder@host) #1 SMP".encode() + b"\0"
    setup[0x400:0x400 + len(version)] = version
    struct.pack_into("<H", setup, 0x20E, 0x400 - 0x200)
    struct.pack_into("<II", setup, 0x248, 64, len(payload))
    return bytes(setup) + b"\0" * 64 + payload


def test_release_from_bzimage_header_and_elf_banner() -> None:
    assert bzimage_release(_bzimage(b"")) == RELEASE
    assert bzimage_release(b"not a kernel" * 100) is None
    assert elf_release(ELF) == RELEASE


@pytest.mark.skipif(shutil.which("lz4") is None, reason="lz4 CLI (Debian package lz4) missing")
def test_lz4_legacy_payload_with_size_trailer_is_extracted() -> None:
    """Debian's cloud kernel: legacy LZ4 plus the 4-byte size the build appends (lz4 exit 1)."""
    elf = ELF + bytes(range(256)) * 64
    packed = subprocess.run(["lz4", "-l", "-c"], input=elf, capture_output=True,
                            check=True).stdout
    assert extract_vmlinux(_bzimage(packed + struct.pack("<I", len(elf)))) == elf


def _tree(root: Path, builtin: str = "kernel/drivers/nvme/host/nvme.ko\n") -> Path:
    root.mkdir(parents=True)
    (root / "kernel").mkdir()
    (root / "modules.order").write_text("")
    (root / "modules.builtin").write_text(builtin)
    return root


def test_modules_layouts(tmp_path: Path) -> None:
    direct = _tree(tmp_path / "pkg" / "lib" / "modules" / RELEASE)
    assert modules_source(direct, RELEASE, "--virtio-kernel") == (direct, RELEASE, False)
    # a make modules_install INSTALL_MOD_PATH=<root> tree
    assert modules_source(tmp_path / "pkg", RELEASE, "--virtio-kernel") == (direct, RELEASE,
                                                                            False)
    build = tmp_path / "build"
    (build / "include" / "config").mkdir(parents=True)
    (build / "include" / "config" / "kernel.release").write_text(RELEASE + "\n")
    assert modules_source(build, None, "--virtio-kernel") == (build, RELEASE, True)
    with pytest.raises(ConfigError, match=r"--virtio-modules: .* holds no kernel modules"):
        modules_source(tmp_path, RELEASE, "--virtio-kernel")


def test_check_choice_names_the_key(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(_bzimage(b""))
    with pytest.raises(ConfigError, match=r"^@pytest.mark.vm\(kernel=\): .* does not exist"):
        check_choice(str(tmp_path / "nope"), None, "@pytest.mark.vm")
    with pytest.raises(ConfigError, match=r"--virtio-kernel: .* give its modules with "
                                          r"--virtio-modules"):
        check_choice(str(kernel), None)
    with pytest.raises(ConfigError, match=r"--virtio-modules: .* is not a directory"):
        check_choice(str(kernel), str(kernel))
    assert check_choice(str(kernel), str(tmp_path)).kernel == kernel


@pytest.mark.skipif(shutil.which("depmod", path="/usr/sbin:/sbin:/usr/bin") is None,
                    reason="depmod (Debian package kmod) missing")
def test_depmod_runs_when_the_tree_has_no_modules_dep(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    dest = stage_modules(src, RELEASE, False, tmp_path / "stage", lambda _m: None)
    assert (dest / "modules.dep").is_file() and not (src / "modules.dep").exists()
    assert "nvme" in available_modules(dest)  # built in (=y) counts as present


def _image(modules_dir: Path) -> GuestImage:
    return GuestImage(key="k", kernel=modules_dir / "vmlinux", rootfs=modules_dir / "r",
                      kernel_version=RELEASE, modules_dir=modules_dir)


def test_absent_driver_is_named_before_boot(tmp_path: Path) -> None:
    mods = _tree(tmp_path / "m")
    (mods / "modules.dep").write_text(
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_pci.ko\n"
        "kernel/drivers/virtio/virtio_pci.ko:\nkernel/drivers/ata/ata_piix.ko:\n"
        "kernel/drivers/scsi/sd_mod.ko:\nkernel/drivers/net/virtio_net.ko:\n")
    image = _image(mods)
    check_drivers(image, spec_from_kwargs({"root_bus": "ide", "disks": ["nvme"],
                                           "nics": ["virtio-net"]}))
    with pytest.raises(MissingDriver) as err:
        check_drivers(image, spec_from_kwargs({"disks": ["virtio-blk", "ahci"]}))
    assert (err.value.device, err.value.modules) == ("disk 'disk1' (bus ahci)", ("ahci",))
    assert f"kernel {RELEASE} has no driver for disk 'disk1' (bus ahci): ahci" in str(err.value)
    with pytest.raises(MissingDriver, match=r"nic 'net0' \(model rtl8139\): 8139cp, 8139too"):
        check_drivers(image, spec_from_kwargs({"nics": ["rtl8139"]}))


def _ctx(modules_image: str | None) -> LaunchContext:
    return LaunchContext(qemu_binary="qemu", accel="tcg", kernel="k", initrd="i",
                         root_image="r", qmp_socket="q", console_socket="c",
                         console_log="l", modules_image=modules_image,
                         vhost_sockets={"root": "/s"})


def _devices(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]


@pytest.mark.parametrize("root_bus, device", [
    ("virtio-blk", "virtio-blk-pci,drive=drv-pvmods,id=pvmods,serial=pvmods"),
    ("vhost-user-blk", "virtio-blk-pci,drive=drv-pvmods,id=pvmods,serial=pvmods"),
    ("ide", "ide-hd,bus=ide.0,unit=1,drive=drv-pvmods,id=pvmods,serial=pvmods"),
    ("nvme", "nvme,drive=drv-pvmods,id=pvmods,serial=pvmods"),
])
def test_modules_disk_rides_the_root_bus(root_bus: str, device: str) -> None:
    argv = to_argv(MachineSpec(root_bus=root_bus), _ctx("/cache/modules.img"))
    assert device in _devices(argv)
    assert "if=none,id=drv-pvmods,file=/cache/modules.img,format=raw,snapshot=on," \
           "cache=unsafe" in argv
    assert not any("pvmods" in d for d in _devices(to_argv(MachineSpec(root_bus=root_bus),
                                                           _ctx(None))))


def test_modules_disk_needs_a_free_unit() -> None:
    spec = spec_from_kwargs({"root_bus": "ide", "disks": ["ide", "ide", "ide"]})
    with pytest.raises(ConfigError, match="modules disk needs a free unit on the ide"):
        to_argv(spec, _ctx("/m.img"))


def test_custom_initrd_keys_it_cannot_honour() -> None:
    custom = Settings(kernel="k", initrd="i", rootfs="r")
    check_honoured(MachineSpec(), custom)
    check_honoured(MachineSpec(root_bus="ahci", initramfs_modules=()), Settings())
    with pytest.raises(ConfigError, match=r"^initramfs_modules=\[\]: --virtio-initrd is used"):
        check_honoured(MachineSpec(initramfs_modules=()), custom)
    with pytest.raises(ConfigError, match=r"^root_bus='nvme': .* nvme drivers that bus needs"):
        check_honoured(MachineSpec(root_bus="nvme"), custom)


def test_vm_modules_needs_kernel() -> None:
    with pytest.raises(ConfigError, match="modules goes with kernel"):
        spec_from_kwargs({"modules": "/lib/modules/x"})


def _staged(cache: Path, name: str, kernel: str) -> Path:
    d = cache / "kernels" / name
    d.mkdir(parents=True)
    (d / "kernel.json").write_text(json.dumps({"kernel": kernel, "release": RELEASE}))
    return d


def test_prune_keeps_the_newest_staging_per_kernel_file(tmp_path: Path) -> None:
    """A rebuilt kernel stages anew; the older staging of the same file is stale."""
    old = _staged(tmp_path, f"{RELEASE}-aaaa", "/src/linux/vmlinux")
    other = _staged(tmp_path, f"{RELEASE}-bbbb", "/boot/vmlinuz")
    new = _staged(tmp_path, f"{RELEASE}-cccc", "/src/linux/vmlinux")
    os.utime(old / "kernel.json", ns=(1, 1))
    dead = tmp_path / "kernels" / f".stage-{RELEASE}-x-{2**22 + 1}"
    dead.mkdir()
    assert stale_kernels(tmp_path) == sorted([old, dead])
    removed = remove_unlocked(stale_kernels(tmp_path))
    assert {p for p, _ in removed} == {old, dead}
    assert new.is_dir() and other.is_dir() and not old.exists()
