"""MachineSpec + LaunchContext -> QEMU argv (pure, golden-tested)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

from pytest_virtio import ids
from pytest_virtio.errors import ConfigError
from pytest_virtio.spec._util import (
    Props,
    TypedProps,
    _argv_props,
    _onoff,
    _opts,
    _transport_props,
    _typed_transport_props,
)
from pytest_virtio.spec.catalogue import (
    _NIC_DEVICE,
    _NUM_QUEUES_PROP,
    _QUEUE_SIZE_PROP,
    AHCI_PORTS,
    COMMAND_TTYS,
    IDE_UNITS,
    LSI_TARGETS,
)
from pytest_virtio.spec.context import LaunchContext, _disk_file, _lookup, command_channel
from pytest_virtio.spec.layout import (
    _controller_users,
    _placement,
    _placements,
    _scsi_controller_options,
)
from pytest_virtio.spec.model import (
    Balloon,
    CdRom,
    Device,
    Disk,
    MachineSpec,
    Nic,
    Pvpanic,
    Rng,
    SerialPorts,
)


def qemu_name(name: str) -> str:
    """A guest name as QEMU's ``-name`` takes it: QEMU parses that value as options
    (``,`` separates them, ``=`` names one), so anything but ``[A-Za-z0-9_.-]``
    becomes ``_``.  It only names the process; our own records keep the real name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "guest"


def _base_argv(spec: MachineSpec, ctx: LaunchContext) -> list[str]:
    mem = f"{spec.memory_mib}M"
    console = [("id", "con0"), ("path", ctx.console_socket), ("server", "on")]
    console += [("wait", "off"), ("logfile", ctx.console_log), ("logappend", "on")]
    channel_socket, channel_log = command_channel(ctx.console_socket)
    channel = [("id", "cmd0"), ("path", channel_socket), ("server", "on"), ("wait", "off"),
               ("logfile", channel_log), ("logappend", "on")]
    qmp = [("id", "qmp0"), ("path", ctx.qmp_socket), ("server", "on"), ("wait", "off")]
    return [
        ctx.qemu_binary,
        "-name", qemu_name(ctx.name),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-machine", f"{spec.machine},accel={ctx.accel},memory-backend=mem",
        "-cpu", "host" if ctx.accel == "kvm" else "max",
        "-smp", str(spec.smp),
        "-m", mem,
        "-object", (f"memory-backend-memfd,id=mem,size={mem},share=on" if ctx.shared_memory
                    else f"memory-backend-ram,id=mem,size={mem}"),
        "-kernel", ctx.kernel,
        "-initrd", ctx.initrd,
        "-append", ctx.append,
        "-chardev", _opts("socket", console),
        "-serial", "chardev:con0",
        "-chardev", _opts("socket", channel),
        *(["-serial", "chardev:cmd0"] if spec.command_channel == "serial" else []),
        "-chardev", _opts("socket", qmp),
        "-mon", "chardev=qmp0,mode=control",
        "-device", "pvpanic",
        "-no-reboot",
        *_fw_cfg_argv(ctx),
    ]  # fmt: skip


def _command_port_argv(spec: MachineSpec) -> list[str]:
    """The virtio console port the guest's command shell is served on (chardev ``cmd0``).

    Last of all devices, so the user's devices keep the PCI slots they have with
    the serial transport (the guest's topology does not depend on the channel)."""
    if spec.command_channel != "virtio-console":
        return []  # the second UART, in the base argv (its order makes it ttyS1)
    port = _opts("virtconsole", [("bus", f"{ids.COMMAND_SERIAL_BUS}.0"), ("chardev", "cmd0"),
                                 ("name", ids.COMMAND_PORT)])
    return ["-device", f"virtio-serial-pci,id={ids.COMMAND_SERIAL_BUS}", "-device", port]


def command_channel_append(spec: MachineSpec) -> tuple[str, ...]:
    """Kernel arguments telling the guest's init where to serve the command shell
    (``pv.cmd=``; pvinit and pv-console default to ttyS1)."""
    tty = COMMAND_TTYS[spec.command_channel]
    return () if tty == COMMAND_TTYS["serial"] else (f"pv.cmd={tty}",)


def _fw_cfg_argv(ctx: LaunchContext) -> list[str]:
    """One ``-fw_cfg`` per blob, sorted so the argv does not depend on dict order."""
    argv: list[str] = []
    for name, path in sorted(ctx.fw_cfg.items()):
        argv += ["-fw_cfg", _opts("", [("name", name), ("file", path)])]
    return argv


def _controllers_argv(spec: MachineSpec) -> list[str]:
    """Shared controllers, once each, before any unit that plugs into them."""
    counts = _controller_users(spec)
    argv: list[str] = []
    if counts["scsi"]:
        argv += [
            "-device",
            _opts("virtio-scsi-pci", [("id", "scsi0"), *_scsi_controller_options(spec)]),
        ]
    if counts["ahci"]:
        argv += ["-device", "ahci,id=ahci0"]
    if counts["lsi"]:
        argv += ["-device", f"lsi53c895a,id={ids.LSI_CONTROLLER}"]
    return argv


def _drive(drive_id: str, path: str, props: Props) -> list[str]:
    return ["-drive", _opts("", [("if", "none"), ("id", drive_id), ("file", path), *props])]


def _disk_drive_props(disk: Disk) -> Props:
    props = [("format", disk.format), ("cache", disk.cache), ("readonly", _onoff(disk.readonly))]
    if disk.discard:
        props.append(("discard", "unmap"))
    return props


def frontend_props(disk: Disk | None, bus: str) -> TypedProps:
    """Per-disk device options, typed: serial, block sizes, queues, ring features, transport.

    The one definition for boot (rendered to ``-device`` by ``_argv_props``) and
    hotplug (``device_add`` takes them as they are). ``disk`` None is the root disk.
    virtio-scsi queues belong to the controller, and its disks have no ring or
    transport of their own.
    """
    if disk is None:
        return [("serial", "root")] if bus == "nvme" else []
    props: TypedProps = []
    if bus != "vhost-user-blk":
        props.append(("serial", disk.serial or disk.name))
        props += _block_size_props(disk)
    if bus == "virtio-scsi":
        return props
    if disk.num_queues is not None:
        props.append((_NUM_QUEUES_PROP[bus], disk.num_queues))
    if disk.queue_size is not None:
        props.append((_QUEUE_SIZE_PROP[bus], disk.queue_size))
    props += [(flag, False) for flag in _ring_features_off(disk)]
    return props + _typed_transport_props(disk.transport)


def _block_size_props(disk: Disk) -> TypedProps:
    """QEMU's ``logical_block_size``/``physical_block_size`` of a block-layer disk.

    The physical block defaults to the logical one: QEMU's own default (512) is
    refused below a larger logical block ("logical_block_size > physical_block_size").
    """
    logical = disk.logical_block_size
    physical = disk.physical_block_size or logical
    props: TypedProps = []
    if logical is not None:
        props.append(("logical_block_size", logical))
    if physical is not None:
        props.append(("physical_block_size", physical))
    return props


def _ring_features_off(disk: Disk) -> list[str]:
    """QEMU property names of the ring features the disk switches off."""
    return [flag for flag in ("event_idx", "indirect_desc") if not getattr(disk, flag)]


_FRONTEND_MODEL: Final[Mapping[str, str]] = MappingProxyType(
    {
        "virtio-blk": "virtio-blk-pci",
        "virtio-scsi": "scsi-hd",
        "ide": "ide-hd",
        "ahci": "ide-hd",
        "lsi": "scsi-hd",
        "nvme": "nvme",
    }
)


def _block_device(
    bus: str, ident: str, drive_id: str, placement: Props, disk: Disk | None
) -> list[str]:
    """The -device for a disk served by QEMU's block layer."""
    props = [*placement, ("drive", drive_id), ("id", ident)]
    props += _argv_props(frontend_props(disk, bus))
    return ["-device", _opts(_FRONTEND_MODEL[bus], props)]


def _vhost_user_device(
    ident: str, socket: str, disk: Disk | None, reconnect: int | None
) -> list[str]:
    chardev = [("id", ids.vhost_chardev_id(ident)), ("path", socket)]
    if reconnect is not None:
        chardev.append(("reconnect", str(reconnect)))
    props = [("chardev", ids.vhost_chardev_id(ident)), ("id", ident),
             *_argv_props(frontend_props(disk, "vhost-user-blk"))]
    return ["-chardev", _opts("socket", chardev), "-device", _opts("vhost-user-blk-pci", props)]


def _root_argv(spec: MachineSpec, ctx: LaunchContext, placed: Mapping[str, Props]) -> list[str]:
    """The root disk: a snapshot=on overlay so no test can write the cached image."""
    if spec.root_bus == "vhost-user-blk":
        socket = _lookup(ctx.vhost_sockets, ids.ROOT, "vhost_sockets")
        return _vhost_user_device(ids.ROOT, socket, None, None)
    drive_props = [("format", ctx.root_format), ("snapshot", _onoff(ctx.root_snapshot)),
                   ("cache", "unsafe")]
    argv = _drive(ids.ROOT_DRIVE, ctx.root_image, drive_props)
    return argv + _block_device(spec.root_bus, ids.ROOT, ids.ROOT_DRIVE,
                                placed.get(ids.ROOT, []), None)


#: Units per shared controller; the modules disk takes the next free one after
#: the root, data disks and CD-ROMs (units 0..n-1 keep their usual places).
_UNITS: Final[Mapping[str, int]] = MappingProxyType(
    {"ide": IDE_UNITS, "ahci": AHCI_PORTS, "lsi": LSI_TARGETS, "scsi": 256}
)
_CONTROLLER: Final[Mapping[str, str]] = MappingProxyType(
    {"ide": "ide", "ahci": "ahci", "lsi": "lsi", "virtio-scsi": "scsi"}
)


def _modules_disk_argv(spec: MachineSpec, ctx: LaunchContext) -> list[str]:
    """The read-only modules disk of a user kernel, on the root disk's bus.

    Why that bus: the initramfs loads exactly the root bus's drivers, so the
    disk is found by them and adds no driver of its own (vhost-user-blk roots
    get a virtio-blk one: same guest driver).
    """
    if ctx.modules_image is None:
        return []
    bus = "virtio-blk" if spec.root_bus == "vhost-user-blk" else spec.root_bus
    ctrl = _CONTROLLER.get(bus, "")
    placement: Props = []
    if ctrl:
        used = _controller_users(spec)[ctrl]
        if used >= _UNITS[ctrl]:
            raise ConfigError(
                f"root bus {spec.root_bus!r}: the kernel's modules disk needs a free unit on "
                f"the {ctrl} controller, but the root disk, data disks and CD-ROMs use all of "
                "them; put a data disk on another bus"
            )
        placement = _placement(ctrl, used)
    # snapshot, not readonly: QEMU's ide-hd refuses a read-only drive; the
    # guest mounts it read-only and the cached image is never written either way.
    drive = _drive(ids.MODULES_DRIVE, ctx.modules_image,
                   [("format", "raw"), ("snapshot", "on"), ("cache", "unsafe")])
    props = [*placement, ("drive", ids.MODULES_DRIVE), ("id", ids.MODULES_DEVICE),
             ("serial", ids.MODULES_DEVICE)]
    return [*drive, "-device", _opts(_FRONTEND_MODEL[bus], props)]


def _disk_argv(disk: Disk, ctx: LaunchContext, placed: Mapping[str, Props]) -> list[str]:
    if disk.bus == "vhost-user-blk":
        socket = _lookup(ctx.vhost_sockets, disk.name, "vhost_sockets")
        return _vhost_user_device(disk.name, socket, disk, disk.reconnect)
    argv = _drive(disk.drive_id, _disk_file(disk, ctx), _disk_drive_props(disk))
    placement = placed.get(disk.name, [])
    return argv + _block_device(disk.bus, disk.name, disk.drive_id, placement, disk)


def nic_mac(nic: Nic, index: int) -> str:
    """The NIC's MAC: its own, else one derived from its position (how the guest finds it)."""
    return nic.mac or f"52:54:00:12:34:{0x56 + index:02x}"


def _user_netdev(nic: Nic, ctx: LaunchContext) -> list[tuple[str, str]]:
    """QEMU's user-mode stack, forwarding a kernel-chosen loopback port to SSH."""
    return [("hostfwd", "tcp:127.0.0.1:0-:22")] if nic.hostfwd_ssh else []


def _stream_netdev(nic: Nic, ctx: LaunchContext) -> list[tuple[str, str]]:
    """A stream to the NIC's passt (which does the SSH forward)."""
    path = _lookup(ctx.net_sockets, nic.name, "net_sockets")
    return [("server", "off"), ("addr.type", "unix"), ("addr.path", path)]


def _tap_netdev(nic: Nic, ctx: LaunchContext) -> list[tuple[str, str]]:
    """The NIC's tap device, opened by the host before QEMU and inherited as ``fd``."""
    return [("fd", str(_lookup(ctx.net_fds, nic.name, "net_fds")))]


#: Each NIC backend's ``-netdev`` type and its options after ``id``.
_NETDEVS: Final[Mapping[str, tuple[str, Callable[[Nic, LaunchContext], list[tuple[str, str]]]]]] = (
    MappingProxyType({"user": ("user", _user_netdev), "passt": ("stream", _stream_netdev),
                      "tap": ("tap", _tap_netdev)}))


def _netdev(nic: Nic, ctx: LaunchContext) -> str:
    """The NIC's ``-netdev`` for its backend."""
    kind, options = _NETDEVS[nic.backend]
    return _opts(kind, [("id", nic.name), *options(nic, ctx)])


def _nic_argv(nic: Nic, index: int, ctx: LaunchContext) -> list[str]:
    mac = nic_mac(nic, index)
    props = [("netdev", nic.name), ("id", ids.nic_device_id(nic.name)), ("mac", mac)]
    props += _transport_props(nic.transport)
    return ["-netdev", _netdev(nic, ctx), "-device", _opts(_NIC_DEVICE[nic.model], props)]


def _serial_argv(dev: SerialPorts, ctx: LaunchContext) -> list[str]:
    argv = [
        "-device",
        _opts("virtio-serial-pci", [("id", dev.name), *_transport_props(dev.transport)]),
    ]
    for index, port in enumerate(dev.names):
        chardev_id = f"{dev.name}-p{index}"
        path = _lookup(ctx.serial_sockets, port, "serial_sockets")
        chardev = [("id", chardev_id), ("path", path), ("server", "on"), ("wait", "off")]
        props = [("bus", f"{dev.name}.0"), ("chardev", chardev_id), ("name", port)]
        props.append(("id", f"{dev.name}-port{index}"))
        argv += ["-chardev", _opts("socket", chardev), "-device", _opts("virtserialport", props)]
    return argv


def _cdrom_argv(dev: CdRom, placed: Mapping[str, Props]) -> list[str]:
    drive_props = [("format", "raw"), ("readonly", "on"), ("media", "cdrom")]
    model = "scsi-cd" if dev.bus == "scsi" else "ide-cd"
    props = [*placed.get(dev.name, []), ("drive", dev.drive_id), ("id", dev.name)]
    return [*_drive(dev.drive_id, dev.iso, drive_props), "-device", _opts(model, props)]


def _other_device_argv(dev: Device, ctx: LaunchContext, placed: Mapping[str, Props]) -> list[str]:
    if isinstance(dev, Balloon):
        props = [("id", dev.name), *_transport_props(dev.transport)]
        if dev.deflate_on_oom:
            props.append(("deflate-on-oom", "on"))
        if dev.free_page_reporting:
            props.append(("free-page-reporting", "on"))
        return ["-device", _opts("virtio-balloon-pci", props)]
    if isinstance(dev, Rng):
        obj = _opts("rng-random", [("id", dev.name), ("filename", "/dev/urandom")])
        props = [("rng", dev.name), ("id", f"{dev.name}-dev"), *_transport_props(dev.transport)]
        return ["-object", obj, "-device", _opts("virtio-rng-pci", props)]
    if isinstance(dev, SerialPorts):
        return _serial_argv(dev, ctx)
    if isinstance(dev, CdRom):
        return _cdrom_argv(dev, placed)
    return []  # Pvpanic: already in the base argv


def device_argv(
    dev: Disk | Nic | Device, ctx: LaunchContext, spec: MachineSpec | None = None
) -> list[str]:
    """The argv fragment for one device as placed in ``spec``.

    Without ``spec`` the device is placed as if it were the only one of its kind
    next to a virtio-blk root (controllers are not included: see ``to_argv``).
    """
    if spec is None:
        spec = _spec_holding(dev)
    placed = _placements(spec)
    if isinstance(dev, Disk):
        return _disk_argv(dev, ctx, placed)
    if isinstance(dev, Nic):
        index = next((i for i, n in enumerate(spec.nics) if n.name == dev.name), 0)
        return _nic_argv(dev, index, ctx)
    if isinstance(dev, Pvpanic):
        return ["-device", "pvpanic"]
    return _other_device_argv(dev, ctx, placed)


def _spec_holding(dev: Disk | Nic | Device) -> MachineSpec:
    if isinstance(dev, Disk):
        return MachineSpec(disks=(dev,))
    if isinstance(dev, Nic):
        return MachineSpec(nics=(dev,))
    return MachineSpec(devices=(dev,))


def to_argv(spec: MachineSpec, ctx: LaunchContext) -> list[str]:
    """THE QEMU command line for ``spec`` in ``ctx``: deterministic, pure.

    Order: base machine, shared controllers, root disk, data disks (spec order),
    NICs, other devices, the command channel's virtio port (if any), ``extra_args``.
    Ids are derived from names so QMP and the guest-side checks can find every
    device again.
    """
    placed = _placements(spec)
    argv = _base_argv(spec, ctx) + _controllers_argv(spec) + _root_argv(spec, ctx, placed)
    argv += _modules_disk_argv(spec, ctx)
    for disk in spec.disks:
        argv += _disk_argv(disk, ctx, placed)
    for index, nic in enumerate(spec.nics):
        argv += _nic_argv(nic, index, ctx)
    for dev in spec.devices:
        argv += _other_device_argv(dev, ctx, placed)
    return argv + _command_port_argv(spec) + list(spec.extra_args)
