"""Your kernel alone: Debian's linux-image-cloud-amd64, given only as --virtio-kernel/--modules.

That kernel is a different config from the image's linux-image-amd64: NVMe
built in, no AHCI and no e1000 driver at all, and its package ships no
modules.dep. The inner run gets nothing but the two flags; the plugin builds
the initramfs, stages the modules (depmod) and gives them to the guest.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.images.builder import extract_vmlinux
from pytest_virtio.images.kernel import fetch_deb_kernel

INNER = '''
import pytest
from pytest_virtio.errors import MissingDriver

RELEASE = {release!r}


@pytest.mark.virtio_matrix(root_bus=["virtio-blk", "ide", "nvme", "ahci"])
def test_root_bus_matrix(guest, virtio_choice):
    assert guest.check("uname -r").stdout.strip() == RELEASE
    # modules come from the kernel's own modules disk, modprobe resolves them
    guest.modprobe("virtio_balloon")
    mods = guest.lsmod()
    assert "virtio_balloon" in mods and not mods["virtio_balloon"].builtin
    assert mods["nvme"].builtin and mods["ext4"].builtin


@pytest.mark.vm(
    root_bus="ide",
    disks=[dict(name="vb", bus="virtio-blk", size="16M"),
           dict(name="vs", bus="virtio-scsi", size="16M"),
           dict(name="nv", bus="nvme", size="16M")],
    nics=["virtio-net"], devices=["rng", "balloon"],
)
@pytest.mark.expect_drivers("virtio_blk", "virtio_scsi", "nvme", "virtio_net", "virtio_rng",
                            "virtio_balloon", "ata_piix")
def test_devices_and_drivers(guest):
    assert guest.disk_drivers("vb")[:2] == ["virtio_blk", "virtio-pci"]
    assert "virtio_scsi" in guest.disk_drivers("vs")
    assert "nvme" in guest.disk_drivers("nv")
    assert guest.check("cat /proc/sys/kernel/osrelease").stdout.strip() == RELEASE
    assert guest.check(f"ls /lib/modules/{{RELEASE}}/modules.dep").ok


@pytest.mark.vm(kernel={tree!r}, root_bus="virtio-scsi")
def test_per_test_kernel_from_a_build_tree(guest):
    """vm(kernel=<build tree>): vmlinux and the modules come from the tree itself."""
    assert guest.check("uname -r").stdout.strip() == RELEASE
    assert "virtio_scsi" in guest.lsmod()
    guest.modprobe("virtio_rng")


@pytest.mark.parametrize("kwargs, device, driver", [
    (dict(disks=["ahci"]), "disk 'disk0' (bus ahci)", "ahci"),
    (dict(nics=["e1000"]), "nic 'net0' (model e1000)", "e1000"),
])
def test_absent_driver_is_named(make_guest, kwargs, device, driver):
    with pytest.raises(MissingDriver) as err:
        make_guest(**kwargs)
    assert err.value.device == device and err.value.modules == (driver,)
    assert RELEASE in str(err.value)
'''


@pytest.fixture(scope="module")
def cloud_kernel(virtio_session: VirtioSession) -> tuple[Path, Path]:
    """The package's kernel and /lib/modules/<ver>, fetched with apt-get download once."""
    return fetch_deb_kernel("linux-image-cloud-amd64", virtio_session.settings.cache_dir)


def _build_tree(kernel: Path, modules: Path, tree: Path) -> Path:
    """The cloud kernel laid out as its build tree would be (vmlinux, .ko beside their
    sources, modules.order without the kernel/ prefix, include/config/kernel.release)."""
    elf = extract_vmlinux(kernel.read_bytes())
    assert elf is not None
    (tree / "include" / "config").mkdir(parents=True)
    (tree / "include" / "config" / "kernel.release").write_text(modules.name + "\n")
    (tree / "vmlinux").write_bytes(elf)
    order = []
    for line in (modules / "modules.order").read_text().split():
        rel = line.removeprefix("kernel/")
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(modules / line, tree / rel)
        order.append(rel)
    (tree / "modules.order").write_text("\n".join(order) + "\n")
    shutil.copy2(modules / "modules.builtin", tree / "modules.builtin")
    return tree


def test_cloud_kernel_device_matrix(
    pytester: pytest.Pytester, virtio_session: VirtioSession, cloud_kernel: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernel, modules = cloud_kernel
    assert not (modules / "modules.dep").exists()  # the package ships none: depmod must run
    monkeypatch.setenv("PYTEST_VIRTIO_CACHE", str(virtio_session.settings.cache_dir))
    tree = kernel.parents[2] / "build-tree"  # beside the unpacked package: staged once
    with FileLock(f"{tree}.lock"):
        if not (tree / "modules.order").is_file():
            shutil.rmtree(tree, ignore_errors=True)
            _build_tree(kernel, modules, tree)
    pytester.makepyfile(test_cloud=INNER.format(release=modules.name, tree=str(tree)))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--virtio-accel={virtio_session.accel().accel}",
        f"--virtio-kernel={kernel}", f"--virtio-modules={modules}", "-q", timeout=600,
    )
    out = result.stdout.str()
    result.assert_outcomes(passed=7, errors=1)
    # AHCI as the root bus: named before any boot, as a setup error of that item
    assert "test_root_bus_matrix[root_bus=ahci]" in out
    assert (f"kernel {modules.name} has no driver for the root disk (bus ahci): ahci neither "
            "a module (modules.dep) nor built in") in out
