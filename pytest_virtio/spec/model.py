"""The guest as frozen data: devices (Disk, Nic, ...) and the MachineSpec that holds them.

Validation happens in ``__post_init__`` so an impossible guest is a ConfigError
when the marker is read, not a cryptic QEMU exit half-way through a test run.
Every message lists the valid choices."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, TypeAlias

from pytest_virtio import ids
from pytest_virtio.errors import ConfigError
from pytest_virtio.spec._util import (
    _as_tuple,
    _check_choice,
    _check_count,
    _check_name,
    _check_virtio_identity,
    _choices,
    _str_tuple,
)
from pytest_virtio.spec.catalogue import (
    _NUM_QUEUES_PROP,
    _QUEUE_SIZE_PROP,
    AHCI_PORTS,
    CACHE_MODES,
    CDROM_BUSES,
    COMMAND_CHANNELS,
    DEVICE_KINDS,
    DISK_BUSES,
    DISK_FORMATS,
    IDE_UNITS,
    LOGICAL_BLOCK_SIZES_BY_BUS,
    LSI_TARGETS,
    MACHINES,
    NET_BACKENDS,
    NIC_MODELS,
    PHYSICAL_BLOCK_SIZE_BUSES,
    PHYSICAL_BLOCK_SIZES,
    QUEUE_LIMIT,
    RING_FEATURE_BUSES,
    ROOT_BUSES,
    ROOT_MODULES,
    SERIAL_LIMITS,
    TRANSPORTS,
    VIRTIO_DISK_BUSES,
)
from pytest_virtio.spec.layout import _controller_users, _scsi_controller_options
from pytest_virtio.units import parse_size


@dataclass(frozen=True, slots=True)
class Disk:
    """A data disk. ``bus`` picks the device model and who serves the I/O.

    The default bus is vhost-user-blk because the project's point is the
    in-process backend; ``image`` (raw|qcow2) replaces the blank ``size`` file.
    The guest sees ``serial`` (default: the name) so tests can find the disk by
    id; for vhost-user-blk the backend answers GET_ID, so QEMU's argv has none.
    How long a serial the guest sees depends on the bus (``SERIAL_LIMITS``: 36
    characters on SCSI, 20 elsewhere).
    """

    name: str = "disk0"
    bus: str = "vhost-user-blk"
    size: str | int = "64M"
    image: str | None = None
    format: str = "raw"
    readonly: bool = False
    cache: str = "none"
    serial: str | None = None
    num_queues: int | None = None
    queue_size: int | None = None
    #: The logical block size the guest sees: QEMU's ``logical_block_size`` device
    #: property, or for vhost-user-blk virtio 1.2 §5.2.4 blk_size served by the
    #: in-process backend (requests not in whole blocks get IOERR). None: 512.
    logical_block_size: int | None = None
    #: The physical block size the guest sees (QEMU's ``physical_block_size``), at
    #: least the logical one. None: the logical block size.
    physical_block_size: int | None = None
    #: False switches the ring feature off on the device (QEMU ``event_idx=off``).
    event_idx: bool = True
    #: False switches indirect descriptors off (QEMU ``indirect_desc=off``).
    indirect_desc: bool = True
    transport: str = "default"
    discard: bool = False
    reconnect: int | None = None
    #: vhost-user-blk served by an outside daemon listening here (e.g. for comparing
    #: against qemu-storage-daemon): no in-process backend is started for the disk.
    external_socket: str | None = None
    #: Record every completed write, flush, discard and write-zeroes of the in-process
    #: backend (``vhost_user.writelog``), and keep the disk's image as it was before
    #: the guest started: ``guest.logged_disk(name)`` gives both, for crash states.
    write_log: bool = False

    def __post_init__(self) -> None:
        _check_name(self.name, "disk")
        _check_choice(self.bus, DISK_BUSES, f"disk {self.name!r}: bus")
        _check_choice(self.format, DISK_FORMATS, f"disk {self.name!r}: format")
        _check_choice(self.cache, CACHE_MODES, f"disk {self.name!r}: cache")
        _check_choice(self.transport, TRANSPORTS, f"disk {self.name!r}: transport")
        if self.image is None:
            parse_size(self.size, f"disk {self.name!r}: size", positive=True)
            if self.format != "raw":
                raise ConfigError(
                    f"disk {self.name!r}: a blank disk (no image=) is always 'raw'; "
                    f"format={self.format!r} needs image= an existing {self.format} file"
                )
        elif not isinstance(self.image, str) or not self.image:
            raise ConfigError(f"disk {self.name!r}: image must be a file path, got {self.image!r}")
        self._check_bus_options()
        self._check_queues()
        self._check_serial()

    @property
    def size_bytes(self) -> int:
        """The blank disk's size in bytes (meaningless when ``image`` is set)."""
        return parse_size(self.size)

    @property
    def drive_id(self) -> str:
        return ids.drive_id(self.name)

    def _check_bus_options(self) -> None:
        where = f"disk {self.name!r} (bus {self.bus!r})"
        if self.transport != "default" and self.bus not in VIRTIO_DISK_BUSES:
            raise ConfigError(
                f"{where}: transport={self.transport!r} only applies to virtio buses: "
                f"{_choices(sorted(VIRTIO_DISK_BUSES))}"
            )
        if self.bus == "vhost-user-blk":
            self._check_vhost_user()
        elif self.reconnect is not None:
            raise ConfigError(f"{where}: reconnect= only applies to bus 'vhost-user-blk'")
        elif self.external_socket is not None:
            raise ConfigError(f"{where}: external_socket= only applies to bus 'vhost-user-blk'")
        elif self.write_log is not False:
            raise ConfigError(f"{where}: write_log= records the in-process backend's "
                              "requests, so it only applies to bus 'vhost-user-blk'")
        if self.readonly and self.bus in ("ide", "ahci"):
            raise ConfigError(
                f"{where}: QEMU's ide-hd cannot use a read-only drive; use one of "
                f"{_choices(b for b in DISK_BUSES if b not in ('ide', 'ahci'))} "
                "or a CdRom"
            )

    def _check_vhost_user(self) -> None:
        where = f"disk {self.name!r} (bus 'vhost-user-blk')"
        if self.format != "raw":
            raise ConfigError(
                f"{where}: the in-process backend serves raw files only; "
                "format must be 'raw' (or use bus 'virtio-blk' for qcow2)"
            )
        if self.cache != "none":
            raise ConfigError(
                f"{where}: cache= is a QEMU block-layer option and does not apply to "
                "vhost-user-blk; leave it at 'none' or use bus 'virtio-blk'"
            )
        if self.discard:
            raise ConfigError(f"{where}: discard= is a QEMU block-layer option; use 'virtio-blk'")
        _check_count(self.reconnect, f"{where}: reconnect (seconds)", 1, 60)
        if not isinstance(self.write_log, bool):
            raise ConfigError(f"{where}: write_log must be True or False, got {self.write_log!r}")
        if self.write_log and self.external_socket is not None:
            raise ConfigError(f"{where}: write_log=True needs the in-process backend; "
                              "a disk served by external_socket= cannot be logged")

    def _check_queues(self) -> None:
        where = f"disk {self.name!r} (bus {self.bus!r})"
        if self.num_queues is not None and self.bus not in _NUM_QUEUES_PROP:
            raise ConfigError(
                f"{where}: num_queues is only supported on buses: {_choices(_NUM_QUEUES_PROP)}"
            )
        if self.queue_size is not None and self.bus not in _QUEUE_SIZE_PROP:
            raise ConfigError(
                f"{where}: queue_size is only supported on buses: {_choices(_QUEUE_SIZE_PROP)}"
            )
        _check_count(self.num_queues, f"{where}: num_queues", 1, QUEUE_LIMIT)
        _check_count(self.queue_size, f"{where}: queue_size", 2, 1024)
        size = self.queue_size
        if size is not None and size & (size - 1):
            raise ConfigError(f"{where}: queue_size must be a power of two, got {size}")
        for flag in ("event_idx", "indirect_desc"):
            value = getattr(self, flag)
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {flag} must be True or False, got {value!r}")
            if not value and self.bus not in RING_FEATURE_BUSES:
                raise ConfigError(f"{where}: {flag}=False is only supported on buses: "
                                  f"{_choices(RING_FEATURE_BUSES)}")
        self._check_block_sizes()

    def _check_block_sizes(self) -> None:
        """Powers of two the bus takes (``LOGICAL_BLOCK_SIZES_BY_BUS``,
        ``PHYSICAL_BLOCK_SIZES``), physical never below logical (QEMU refuses it)."""
        where = f"disk {self.name!r} (bus {self.bus!r})"
        lbs, pbs = self.logical_block_size, self.physical_block_size
        if lbs is not None:
            if self.external_socket is not None:
                raise ConfigError(f"{where}: logical_block_size is served by the in-process "
                                  "backend; an external_socket daemon sets its own")
            sizes = LOGICAL_BLOCK_SIZES_BY_BUS[self.bus]
            if isinstance(lbs, bool) or lbs not in sizes:
                raise ConfigError(f"{where}: logical_block_size must be one of "
                                  f"{_choices(str(n) for n in sizes)}, got {lbs!r}")
        if pbs is None:
            return
        if self.bus not in PHYSICAL_BLOCK_SIZE_BUSES:
            raise ConfigError(f"{where}: physical_block_size is only supported on buses: "
                              f"{_choices(PHYSICAL_BLOCK_SIZE_BUSES)}")
        if isinstance(pbs, bool) or pbs not in PHYSICAL_BLOCK_SIZES:
            raise ConfigError(f"{where}: physical_block_size must be a power of two in "
                              f"512..2097152 (2 MiB), got {pbs!r}")
        if pbs < (lbs or 512):
            raise ConfigError(f"{where}: physical_block_size {pbs} is smaller than "
                              f"logical_block_size {lbs or 512}; give at least {lbs or 512}")

    def _check_serial(self) -> None:
        limit = SERIAL_LIMITS[self.bus]
        if self.serial is None:
            if len(self.name) > limit:
                raise ConfigError(
                    f"disk {self.name!r} (bus {self.bus!r}): the name doubles as the disk "
                    f"serial, which holds {limit} characters on bus {self.bus!r}; "
                    "shorten it or give serial="
                )
            return
        where = f"disk {self.name!r} (bus {self.bus!r})"
        if not isinstance(self.serial, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.serial):
            raise ConfigError(
                f"{where}: serial must be letters, digits, '_', '.', '-', got {self.serial!r}"
            )
        if len(self.serial) > limit:
            raise ConfigError(
                f"{where}: serial {self.serial!r} has {len(self.serial)} characters but bus "
                f"{self.bus!r} holds {limit} (QEMU would cut it and the guest never see it); "
                f"shorten it{_longer_serials(limit)}"
            )


def _longer_serials(limit: int) -> str:
    """Where a longer serial fits, for the error message (empty when nowhere)."""
    longer = sorted(b for b, n in SERIAL_LIMITS.items() if n > limit)
    if not longer:
        return ""
    return f" or use a bus that holds {max(SERIAL_LIMITS.values())}: {_choices(longer)}"


#: Each NIC backend as an error message names it.
_BACKEND_WHAT: Final[Mapping[str, str]] = MappingProxyType(
    {"user": "QEMU user-mode networking", "passt": "one passt process",
     "tap": "a single-queue tap device"})


@dataclass(frozen=True, slots=True)
class Nic:
    """A NIC; no bridge, xdist-safe on every ``backend``.

    ``backend`` carries its frames on the host: ``"user"`` (QEMU's user-mode
    network, slirp) or ``"passt"`` (Debian's ``passt``, one process per NIC,
    reached over a unix socket; several times faster, so a NIC model and not
    the backend is what a bandwidth test measures); neither needs root.
    ``"tap"`` (root only): a tap device in a network namespace of its own, which
    the plugin makes per NIC and which vanishes with it; the host side of the
    guest's traffic (iperf3, the token server, SSH) lives in that namespace, so
    nothing is exposed on the host.  Every way the guest is 10.0.2.15/24 behind
    gateway 10.0.2.2 (the host's loopback, or the namespace's end of the tap).
    ``hostfwd_ssh`` forwards a kernel-chosen port on 127.0.0.1 to guest port 22
    (on tap: SSH connects inside the namespace).  ``queues`` above 1 is refused:
    every backend has a single queue pair here, so multiqueue would silently
    measure nothing.
    """

    model: str = "virtio-net"
    name: str = "net0"
    hostfwd_ssh: bool = True
    transport: str = "default"
    queues: int | None = None
    mac: str | None = None
    backend: str = "user"

    def __post_init__(self) -> None:
        _check_name(self.name, "nic")
        _check_choice(self.model, NIC_MODELS, f"nic {self.name!r}: model")
        _check_choice(self.transport, TRANSPORTS, f"nic {self.name!r}: transport")
        _check_choice(self.backend, NET_BACKENDS, f"nic {self.name!r}: backend")
        if self.transport != "default" and self.model != "virtio-net":
            raise ConfigError(
                f"nic {self.name!r}: transport={self.transport!r} only applies to model "
                "'virtio-net'"
            )
        if self.queues is not None and self.model != "virtio-net":
            raise ConfigError(f"nic {self.name!r}: queues only applies to model 'virtio-net'")
        if self.queues not in (None, 1):
            raise ConfigError(
                f"nic {self.name!r}: queues={self.queues!r} is not possible: backend "
                f"{self.backend!r} ({_BACKEND_WHAT[self.backend]}) has one queue pair; "
                "valid values: None, 1"
            )
        if self.mac is not None and not re.match(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$", self.mac):
            raise ConfigError(
                f"nic {self.name!r}: mac must look like 52:54:00:12:34:56, got {self.mac!r}"
            )


@dataclass(frozen=True, slots=True)
class Balloon:
    """virtio-balloon: ``guest.balloon(target)`` resizes guest RAM, ``balloon_stats()`` reads it.

    ``deflate_on_oom`` (virtio 1.2 §5.5.3, VIRTIO_BALLOON_F_DEFLATE_ON_OOM): the
    guest may take pages back from the balloon instead of OOM-killing.
    ``free_page_reporting`` (§5.5.3, VIRTIO_BALLOON_F_PAGE_REPORTING): the guest
    reports freed pages so the host can reclaim them.
    """

    name: str = "balloon0"
    transport: str = "default"
    deflate_on_oom: bool = False
    free_page_reporting: bool = False

    def __post_init__(self) -> None:
        _check_virtio_identity(self.name, self.transport, "balloon")
        for key in ("deflate_on_oom", "free_page_reporting"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(
                    f"balloon {self.name!r}: {key} must be True or False, "
                    f"got {getattr(self, key)!r}"
                )


@dataclass(frozen=True, slots=True)
class Rng:
    """virtio-rng fed from the host's /dev/urandom (never blocks the guest's boot)."""

    name: str = "rng0"
    transport: str = "default"

    def __post_init__(self) -> None:
        _check_virtio_identity(self.name, self.transport, "rng")


@dataclass(frozen=True, slots=True)
class SerialPorts:
    """A virtio-serial controller with named ports, each a unix socket on the host.

    The socket paths come from ``LaunchContext.serial_sockets`` (port name ->
    path) because only the machine knows its run directory.
    """

    names: tuple[str, ...] = ("org.test.0",)
    name: str = "vser0"
    transport: str = "default"

    def __post_init__(self) -> None:
        _check_virtio_identity(self.name, self.transport, "serial")
        names = _str_tuple(self.names, f"serial {self.name!r}: names")
        object.__setattr__(self, "names", names)
        if not names or len(names) > 30:
            raise ConfigError(f"serial {self.name!r}: give 1..30 port names, got {len(names)}")
        for port in names:
            if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", port):
                raise ConfigError(
                    f"serial {self.name!r}: port name {port!r} must be 1..64 characters of "
                    "letters, digits, '_', '.', '-'"
                )
        if len(set(names)) != len(names):
            raise ConfigError(f"serial {self.name!r}: duplicate port names in {names!r}")


@dataclass(frozen=True, slots=True)
class GuestAgent(SerialPorts):
    """The QEMU guest agent's port: a virtio-serial controller with the one port
    qemu-ga opens (``org.qemu.guest_agent.0``), for ``run(via="agent")``.

    A SerialPorts, so argv, drivers and the host end are the serial ones; the
    port name is fixed because the agent in the guest looks for exactly it.
    """

    names: tuple[str, ...] = field(default=(ids.AGENT_PORT,), init=False)
    name: str = "qga0"


@dataclass(frozen=True, slots=True)
class CdRom:
    """A read-only ISO on an emulated CD drive (ide-cd, or scsi-cd on virtio-scsi)."""

    iso: str = ""
    bus: str = "ide"
    name: str = "cd0"

    def __post_init__(self) -> None:
        _check_name(self.name, "cdrom")
        _check_choice(self.bus, CDROM_BUSES, f"cdrom {self.name!r}: bus")
        if not isinstance(self.iso, str) or not self.iso:
            raise ConfigError(f"cdrom {self.name!r}: iso= (path of an ISO image) is required")

    @property
    def drive_id(self) -> str:
        return ids.drive_id(self.name)


@dataclass(frozen=True, slots=True)
class Pvpanic:
    """pvpanic is in every guest's base argv (panics must fail fast); naming it is a no-op."""

    name: str = "pvpanic"


Device: TypeAlias = Balloon | Rng | SerialPorts | GuestAgent | CdRom | Pvpanic
_DEVICE_TYPES: Final = (Balloon, Rng, SerialPorts, GuestAgent, CdRom, Pvpanic)
_DEVICE_CLASS: Final[Mapping[str, type[Any]]] = MappingProxyType(
    {"balloon": Balloon, "rng": Rng, "serial": SerialPorts, "agent": GuestAgent, "cdrom": CdRom,
     "pvpanic": Pvpanic}
)




#: Guest RAM bounds in MiB: QEMU takes whole MiB; 64 MiB still boots our initramfs.
MEMORY_MIB_MIN: Final = 64
MEMORY_MIB_MAX: Final = 64 << 10


def memory_mib(value: int | str) -> int:
    """Guest RAM in MiB from what ``memory=`` takes: a size (``"1G"``, ``"1024M"``,
    ``"1.5G"``), a bare number of MiB as QEMU's ``-m`` reads it (64..65536), or a
    byte count (the size grammar's bare number, ``1 << 30``).

    The two readings of a bare number cannot meet: the largest MiB count (65536) is
    far below the smallest byte count (64 MiB), so every valid number means one thing,
    and a MiB count read again (``replace``, ``merge``) stays what it was.
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MEMORY_MIB_MAX:
        mib, exact = value, True
    else:
        size = parse_size(value, "memory", positive=True)
        mib, exact = size >> 20, not size % (1 << 20)
    if not exact or not MEMORY_MIB_MIN <= mib <= MEMORY_MIB_MAX:
        raise ConfigError(f"memory must be a whole number of MiB in 64M..64G, got {value!r}")
    return mib


@dataclass(frozen=True, slots=True)
class MachineSpec:
    """One guest: memory, CPUs, root disk bus, data disks, NICs, other devices.

    ``kernel_args`` are for whoever builds ``LaunchContext.append`` (the machine
    joins them to the image's base line); ``extra_args`` are raw QEMU arguments
    appended last by ``to_argv`` (the escape hatch).
    """

    #: Guest RAM in MiB. Given as a size (``"1G"``, ``"1024M"``) or a number (see
    #: :func:`memory_mib`), parsed once here: equal machines are equal and hash equal.
    memory: int = 512
    smp: int = 1
    machine: str = "pc"
    root_bus: str = "virtio-blk"
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    devices: tuple[Device, ...] = ()
    kernel_args: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    #: Modules the initramfs loads to find the root disk; None = ROOT_MODULES[root_bus].
    #: Naming them lets a test prove what happens when a driver is missing.
    initramfs_modules: tuple[str, ...] | None = None
    #: This test's own kernel (bzImage, vmlinux or build tree) and its modules
    #: (see ``--virtio-kernel``/``--virtio-modules``); None = the session's.
    kernel: str | None = None
    modules: str | None = None
    #: This test's image recipe (a shipped name such as ``"bookworm-distro"``, or a
    #: recipe file), built and cached like the session's; None = ``--virtio-image``.
    image: str | None = None
    #: A writable root kept across boots: this file holds the guest's own copy of the
    #: image's root (made on first use). Later boots naming it see what earlier ones
    #: wrote; a distro image then boots the initramfs on the copy's /boot, as its
    #: bootloader would. None = a throwaway overlay (nothing a test writes survives).
    root_disk: str | None = None
    #: The command channel's transport (:data:`~pytest_virtio.spec.catalogue.COMMAND_CHANNELS`).
    command_channel: str = "serial"

    def __post_init__(self) -> None:
        for name in ("disks", "nics", "devices"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name), name))
        object.__setattr__(self, "kernel_args", _str_tuple(self.kernel_args, "kernel_args"))
        object.__setattr__(self, "extra_args", _str_tuple(self.extra_args, "extra_args"))
        if self.initramfs_modules is not None:
            mods = _str_tuple(self.initramfs_modules, "initramfs_modules")
            for mod in mods:
                if not re.fullmatch(r"[A-Za-z0-9_-]+", mod):
                    raise ConfigError(f"initramfs_modules: {mod!r} is not a module name")
            object.__setattr__(self, "initramfs_modules", mods)
        for key in ("kernel", "modules", "image", "root_disk"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{key} must be a path (str), got {value!r}")
        if self.modules is not None and self.kernel is None:
            raise ConfigError("modules goes with kernel: give the kernel these modules belong to")
        if self.image is not None and self.kernel is not None:
            raise ConfigError("image and kernel: a vm(kernel=...) boots on the session's image; "
                              "give one of them")
        object.__setattr__(self, "memory", memory_mib(self.memory))
        _check_count(self.smp, "smp", 1, 8)
        _check_choice(self.machine, MACHINES, "machine")
        _check_choice(self.root_bus, ROOT_BUSES, "root_bus")
        _check_choice(self.command_channel, COMMAND_CHANNELS, "command_channel")
        self._check_types()
        self._check_names()
        self._check_slots()
        _scsi_controller_options(self)

    @property
    def memory_mib(self) -> int:
        """``memory`` by the name of its unit (parsed once, in ``__post_init__``)."""
        return self.memory

    @property
    def cdroms(self) -> tuple[CdRom, ...]:
        """The CD-ROMs among ``devices``, in order (placement gives them units after the disks)."""
        return tuple(d for d in self.devices if isinstance(d, CdRom))

    @property
    def root_modules(self) -> tuple[str, ...]:
        """What the initramfs must load: the explicit list, else the root bus's drivers."""
        if self.initramfs_modules is not None:
            return self.initramfs_modules
        return ROOT_MODULES[self.root_bus]

    def replace(self, **changes: Any) -> MachineSpec:
        """A copy with ``changes`` applied and re-validated."""
        return dataclasses.replace(self, **changes)

    def merge(self, **changes: Any) -> MachineSpec:
        """Like ``replace`` but sequence fields are extended instead of replaced.

        Why: a fixture default (say, one NIC) plus a marker adding a disk should
        give both, not whichever came last."""
        merged: dict[str, Any] = {}
        for key, value in changes.items():
            current = getattr(self, key)
            merged[key] = current + _as_tuple(value, key) if isinstance(current, tuple) else value
        return dataclasses.replace(self, **merged)

    def _check_types(self) -> None:
        for disk in self.disks:
            if not isinstance(disk, Disk):
                raise ConfigError(f"disks must be Disk objects, got {disk!r}")
        for nic in self.nics:
            if not isinstance(nic, Nic):
                raise ConfigError(f"nics must be Nic objects, got {nic!r}")
        for dev in self.devices:
            if not isinstance(dev, _DEVICE_TYPES):
                raise ConfigError(
                    f"devices must be one of {_choices(DEVICE_KINDS)} "
                    f"(Balloon, Rng, SerialPorts, GuestAgent, CdRom, Pvpanic), got {dev!r}"
                )

    def _check_names(self) -> None:
        seen: set[str] = set()
        for item in (*self.disks, *self.nics, *self.devices):
            if item.name in seen:
                raise ConfigError(
                    f"duplicate device name {item.name!r}: every disk, nic and device "
                    "needs its own name"
                )
            seen.add(item.name)
        if sum(isinstance(d, Balloon) for d in self.devices) > 1:
            raise ConfigError("QEMU supports only one balloon device per guest")
        ports = [p for d in self.devices if isinstance(d, SerialPorts) for p in d.names]
        if len(ports) != len(set(ports)):
            raise ConfigError(f"duplicate virtio-serial port names across devices: {ports!r}")
        if ids.COMMAND_PORT in ports:
            raise ConfigError(f"virtio-serial port name {ids.COMMAND_PORT!r} is the command "
                              "channel's (command_channel='virtio-console'); pick another")

    def _check_slots(self) -> None:
        counts = _controller_users(self)
        if counts["ide"] and self.machine != "pc":
            raise ConfigError(
                f"IDE disks/CD-ROMs need machine 'pc' (PIIX IDE); machine {self.machine!r} "
                "has none — use bus 'ahci' instead"
            )
        limits = {"ide": IDE_UNITS, "ahci": AHCI_PORTS, "lsi": LSI_TARGETS}
        for bus, limit in limits.items():
            if counts[bus] > limit:
                raise ConfigError(
                    f"too many {bus} units: {counts[bus]} (root disk and CD-ROMs included) "
                    f"but the controller has {limit}"
                )
