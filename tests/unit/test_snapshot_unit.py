"""Snapshot templates without QEMU: which shapes can be saved, argv."""

from __future__ import annotations

import pytest

from pytest_virtio import spec as spec_mod
from pytest_virtio.guests.settings import Settings
from pytest_virtio.guests.snapshot import template_shape, unsupported


def _spec(**kw) -> spec_mod.MachineSpec:
    return spec_mod.spec_from_kwargs(kw)


def test_vhost_user_data_disks_are_plugged_after_the_restore() -> None:
    spec = _spec(disks=["virtio-blk", "vhost-user-blk", "ide"])
    shape, plugged = template_shape(spec)
    assert [d.bus for d in shape.disks] == ["virtio-blk", "ide"]
    assert [d.bus for d in plugged] == ["vhost-user-blk"]
    assert unsupported(spec) is None
    assert template_shape(_spec(disks=["virtio-blk"]))[0] == _spec(disks=["virtio-blk"])


def test_one_template_per_machine_however_its_memory_is_spelled() -> None:
    """Templates are keyed on the shape: vm(memory="1G") and vm(memory="1024M") are one
    machine, so the second restores the first one's template instead of booting again."""
    one, _ = template_shape(_spec(memory="1G", disks=["virtio-blk", "vhost-user-blk"]))
    two, _ = template_shape(_spec(memory="1024M", disks=["virtio-blk", "vhost-user-blk"]))
    templates = {one: "saved"}
    assert templates.get(two) == "saved"


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"root_bus": "vhost-user-blk"}, "vhost-user-blk root"),
    ({"disks": [{"bus": "vhost-user-blk", "external_socket": "/x.sock"}]}, "another process"),
    ({"disks": [{"bus": "virtio-blk", "image": "/x.img"}]}, "in place"),
    ({"devices": [{"kind": "serial", "names": ["p0"]}]}, "virtio-serial"),
    ({"root_disk": "/x/root.raw"}, "kept across boots"),
])
def test_shapes_that_boot_instead_say_why(kwargs, why) -> None:
    reason = unsupported(_spec(**kwargs))
    assert reason is not None and why in reason


def test_own_root_overlay_is_written_in_place() -> None:
    ctx = spec_mod.LaunchContext(
        qemu_binary="qemu", accel="tcg", kernel="k", initrd="i", root_image="/r.qcow2",
        root_format="qcow2", root_snapshot=False, qmp_socket="q", console_socket="c",
        console_log="l",
    )
    argv = spec_mod.to_argv(spec_mod.MachineSpec(), ctx)
    drive = next(a for a in argv if a.startswith("if=none,id=drv-root"))
    assert "snapshot=off" in drive and "file=/r.qcow2" in drive and "format=qcow2" in drive


def test_snapshot_setting() -> None:
    assert Settings.from_values({}).snapshot is False
    assert Settings.from_values({"snapshot": "on"}).snapshot is True
