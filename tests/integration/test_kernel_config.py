"""The guest kernel's config: read on the host, agreeing with the running kernel, and
naming a missing driver's config state before any boot.

Run under the shared QEMU lock (one boot):
``flock /tmp/pv-qemu.lock .venv/bin/python -m pytest tests/integration/test_kernel_config.py``
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_virtio.errors import MissingDriver
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.images.kconfig import Tristate
from pytest_virtio.spec import MachineSpec, spec_from_kwargs


@pytest.fixture(scope="module")
def default_guest(boot_shared: Callable[[MachineSpec, str], Guest]) -> Guest:
    return boot_shared(MachineSpec(), "kconfig")


def test_the_default_images_config_is_read_on_the_host(virtio_session: VirtioSession) -> None:
    """Debian's /boot/config-<release>, copied out of the root disk, without a boot."""
    image = virtio_session.image()
    config = virtio_session.kernel_config()
    assert config is not None
    assert config.source == str(image.cache_dir / f"config-{image.kernel_version}")
    assert config.module("virtio_blk") and config.missing("IKCONFIG")
    assert virtio_session.kernel_config() is config  # once per kernel


def test_guest_kernel_config_is_the_running_kernels(default_guest: Guest) -> None:
    """The host's copy equals what the guest itself has, and says of virtio_blk and
    virtio_pci what the running kernel shows: a module has /sys/module/<m>/initstate."""
    release = default_guest.check("uname -r").stdout.strip()
    host = default_guest.kernel_config()
    inside = default_guest.kernel_config(in_guest=True)
    assert inside.source == f"/boot/config-{release} in the guest"
    assert host == inside and host.source != inside.source
    assert default_guest.kernel_config() is host  # read once per guest
    for module, symbol in (("virtio_blk", "VIRTIO_BLK"), ("virtio_pci", "VIRTIO_PCI")):
        state = default_guest.run(f"cat /sys/module/{module}/initstate").stdout.strip()
        assert host.state(symbol) is (Tristate.M if state == "live" else Tristate.Y), module


def _build_tree(session: VirtioSession, tree: Path, config_line: str) -> Path:
    """The image's own kernel laid out as a build tree whose virtio_blk was not built:
    vmlinux, the virtio modules but virtio_blk.ko, kernel.release, and its real .config
    with CONFIG_VIRTIO_BLK=m replaced by ``config_line``."""
    image = session.image()
    mods = image.modules_dir
    assert mods is not None
    (tree / "include" / "config").mkdir(parents=True)
    (tree / "include" / "config" / "kernel.release").write_text(image.kernel_version + "\n")
    os.link(image.kernel, tree / "vmlinux")
    order = []
    for line in (mods / "modules.order").read_text().split():
        if "virtio" in line and not line.endswith("/virtio_blk.ko"):
            rel = line.removeprefix("kernel/")
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(mods / line, tree / rel)
            order.append(rel)
    (tree / "modules.order").write_text("\n".join(order) + "\n")
    (tree / "modules.builtin").write_bytes((mods / "modules.builtin").read_bytes())
    config = session.kernel_config()
    assert config is not None
    text = Path(config.source).read_text()
    assert "CONFIG_VIRTIO_BLK=m\n" in text
    (tree / ".config").write_text(text.replace("CONFIG_VIRTIO_BLK=m\n", config_line + "\n"))
    return tree


@pytest.mark.parametrize("config_line, verdict", [
    ("# CONFIG_VIRTIO_BLK is not set",
     "CONFIG_VIRTIO_BLK is not set in this kernel's config ({tree}/.config): rebuild the "
     "kernel with CONFIG_VIRTIO_BLK=m or =y"),
    ("CONFIG_VIRTIO_BLK=m",
     "CONFIG_VIRTIO_BLK=m ({tree}/.config) but the virtio_blk module is missing from the "
     "modules tree {modules}"),
])
def test_a_build_trees_missing_driver_names_its_config(
    virtio_session: VirtioSession, tmp_path: Path, config_line: str, verdict: str,
) -> None:
    """vm(kernel=<tree>) without virtio_blk: MissingDriver before QEMU starts, saying
    whether the kernel was built without it or its module was not installed."""
    tree = _build_tree(virtio_session, tmp_path / "linux", config_line)
    spec = spec_from_kwargs({"kernel": str(tree)})  # its root disk is virtio-blk
    with pytest.raises(MissingDriver) as err:
        virtio_session.boot(spec, "kconfig-tree")
    modules = virtio_session.image_for(spec).modules_dir
    assert (err.value.device, err.value.modules) == ("the root disk (bus virtio-blk)",
                                                     ("virtio_blk",))
    assert err.value.config_verdict.startswith(verdict.format(tree=tree, modules=modules))
    assert err.value.config_verdict in str(err.value)
