"""Hotplug: a Disk as QMP blockdev-add/chardev-add/device_add arguments, a Nic as
netdev_add/device_add arguments."""

from __future__ import annotations

from typing import Any, Final

from pytest_virtio import ids
from pytest_virtio.errors import ConfigError
from pytest_virtio.spec._util import _choices, _typed_transport_props
from pytest_virtio.spec.argv import _FRONTEND_MODEL, frontend_props
from pytest_virtio.spec.catalogue import _NIC_DEVICE
from pytest_virtio.spec.context import LaunchContext, _disk_file, _lookup
from pytest_virtio.spec.model import Disk, Nic

_HOTPLUG_BUSES: Final = ("virtio-blk", "vhost-user-blk", "virtio-scsi")


def _blockdev_cache(cache: str) -> dict[str, bool]:
    """-drive cache= modes expressed as blockdev-add's cache.direct/no-flush."""
    return {"direct": cache in ("none", "directsync"), "no-flush": cache == "unsafe"}


def hotplug_props(disk: Disk, ctx: LaunchContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """(backend args, ``device_add`` args) for hot-plugging ``disk`` over QMP.

    The backend args are for ``blockdev-add`` (block-layer buses) or
    ``chardev-add`` (vhost-user-blk); ``hotplug_commands`` pairs them with the
    right command name. virtio-scsi needs the ``scsi0`` controller at boot (a
    virtio-scsi disk or root in the spec); the hot disk goes to a free scsi-id
    chosen by QEMU.
    """
    if disk.bus not in _HOTPLUG_BUSES:
        raise ConfigError(
            f"disk {disk.name!r}: bus {disk.bus!r} cannot be hot-plugged; "
            f"choose one of: {_choices(_HOTPLUG_BUSES)}"
        )
    if disk.bus == "vhost-user-blk":
        return _vhost_user_hotplug(disk, ctx)
    blockdev: dict[str, Any] = {
        "node-name": disk.drive_id,
        "driver": disk.format,
        "read-only": disk.readonly,
        "cache": _blockdev_cache(disk.cache),
        "file": {"driver": "file", "filename": _disk_file(disk, ctx)},
    }
    if disk.discard:
        blockdev["discard"] = "unmap"
    device: dict[str, Any] = {"driver": _FRONTEND_MODEL[disk.bus], "id": disk.name}
    device["drive"] = disk.drive_id
    if disk.bus == "virtio-scsi":
        device["bus"] = "scsi0.0"
    if disk.cache in ("writethrough", "directsync"):
        device["write-cache"] = "off"
    device.update(frontend_props(disk, disk.bus))
    return blockdev, device


def _vhost_user_hotplug(disk: Disk, ctx: LaunchContext) -> tuple[dict[str, Any], dict[str, Any]]:
    socket = _lookup(ctx.vhost_sockets, disk.name, "vhost_sockets")
    data: dict[str, Any] = {"addr": {"type": "unix", "data": {"path": socket}}, "server": False}
    if disk.reconnect is not None:
        data["reconnect"] = disk.reconnect
    chardev = {"id": ids.vhost_chardev_id(disk.name), "backend": {"type": "socket", "data": data}}
    device: dict[str, Any] = {"driver": "vhost-user-blk-pci", "id": disk.name}
    device["chardev"] = ids.vhost_chardev_id(disk.name)
    device.update(frontend_props(disk, disk.bus))
    return chardev, device


def hotplug_commands(disk: Disk, ctx: LaunchContext) -> list[tuple[str, dict[str, Any]]]:
    """The QMP commands, in order, that hot-plug ``disk`` (then ``device_del`` by id)."""
    backend, device = hotplug_props(disk, ctx)
    first = "chardev-add" if disk.bus == "vhost-user-blk" else "blockdev-add"
    return [(first, backend), ("device_add", device)]


#: NIC backends a hot-plugged NIC may have: passt needs its process started and
#: tap its namespace made before QEMU opens the netdev, which only a boot does.
_HOTPLUG_NET_BACKENDS: Final = ("user",)


def nic_hotplug_commands(nic: Nic, mac: str) -> list[tuple[str, dict[str, Any]]]:
    """The QMP commands, in order, that hot-plug ``nic`` with MAC ``mac``: its
    ``netdev_add`` (id: the NIC's name, as at boot) and ``device_add`` (id:
    :func:`ids.nic_device_id`); ``device_del`` and ``netdev_del`` take them back."""
    if nic.backend not in _HOTPLUG_NET_BACKENDS:
        raise ConfigError(
            f"nic {nic.name!r}: backend {nic.backend!r} cannot be hot-plugged (its host side "
            f"starts with the guest); choose one of: {_choices(_HOTPLUG_NET_BACKENDS)}, or "
            "give the guest this NIC at boot (vm(nics=[...]))"
        )
    if nic.hostfwd_ssh:
        raise ConfigError(
            f"nic {nic.name!r}: hostfwd_ssh=True cannot be hot-plugged (SSH is forwarded by "
            "the NIC the guest booted with); pass hostfwd_ssh=False"
        )
    netdev: dict[str, Any] = {"type": "user", "id": nic.name}
    device: dict[str, Any] = {"driver": _NIC_DEVICE[nic.model], "id": ids.nic_device_id(nic.name),
                              "netdev": nic.name, "mac": mac}
    device.update(_typed_transport_props(nic.transport))
    return [("netdev_add", netdev), ("device_add", device)]
