"""The names we give QEMU objects: one place, so argv, hotplug QMP, unplug,
snapshots and socket paths cannot drift apart.

Why it matters: an unplug deletes ``drive_id(name)`` and a hotplug rollback
removes ``vhost_chardev_id(name)``; a spelling that differed from the argv's
would leave the node behind and make the next hotplug of that name fail.
"""

from __future__ import annotations

__all__ = ["AGENT_PORT", "COMMAND_PORT", "COMMAND_SERIAL_BUS", "LSI_CONTROLLER", "MODULES_DEVICE",
           "MODULES_DRIVE", "ROOT", "ROOT_DRIVE", "drive_id", "nic_device_id", "passt_socket_name",
           "vhost_chardev_id", "vhost_socket_name"]

#: The root disk's name (its device id; ``-drive``/blockdev node ``drv-root``).
ROOT = "root"
#: The virtio-serial port name qemu-ga opens by default (systemd's unit waits for it).
AGENT_PORT = "org.qemu.guest_agent.0"
#: The virtio-serial controller and console port of the ``virtio-console`` command
#: channel (``vm(command_channel="virtio-console")``); the guest sees the port as hvc0.
COMMAND_SERIAL_BUS = "pvcmd"
COMMAND_PORT = "org.pytest-virtio.command"
#: The one LSI 53C895A controller all ``lsi`` disks share.
LSI_CONTROLLER = "lsi0"
#: The read-only modules disk of a user kernel (device id and serial).
MODULES_DEVICE = "pvmods"


def drive_id(name: str) -> str:
    """Block node (``-drive id=`` / ``blockdev-add node-name=``) of disk ``name``."""
    return f"drv-{name}"


def vhost_chardev_id(name: str) -> str:
    """The socket chardev a vhost-user-blk device ``name`` connects through."""
    return f"vu-{name}"


def nic_device_id(name: str) -> str:
    """The ``-device`` id of NIC ``name`` (its netdev is ``name`` itself)."""
    return f"{name}-dev"


def passt_socket_name(name: str) -> str:
    """File name of the unix socket NIC ``name``'s passt listens on (``backend="passt"``)."""
    return f"passt-{name}.sock"


def vhost_socket_name(name: str) -> str:
    """File name of the in-process backend's unix socket for disk ``name``."""
    return f"vu-{name}.sock"


ROOT_DRIVE = drive_id(ROOT)
MODULES_DRIVE = drive_id(MODULES_DEVICE)
