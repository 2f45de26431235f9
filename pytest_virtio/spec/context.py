"""LaunchContext: the host paths and sockets one boot provides to the argv."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from types import MappingProxyType
from typing import TypeVar

from pytest_virtio.errors import ConfigError
from pytest_virtio.spec._util import _check_choice, _choices
from pytest_virtio.spec.catalogue import DISK_FORMATS
from pytest_virtio.spec.model import Disk

_V = TypeVar("_V")


def _frozen_map(value: Mapping[str, _V]) -> Mapping[str, _V]:
    return MappingProxyType(dict(value))


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchContext:
    """Where things are on this host for this one launch (paths, binary, accel).

    Separate from MachineSpec because the spec is the test's wish (hashable,
    comparable, shown in ids) while these are per-run facts chosen by the machine.
    ``append`` is the complete kernel command line (image base line plus
    ``spec.kernel_args``): composing it is the machine's job, ``to_argv`` uses it
    verbatim.
    """

    qemu_binary: str
    accel: str
    kernel: str
    initrd: str
    root_image: str
    root_format: str = "raw"
    #: False when ``root_image`` is already this guest's own overlay (a snapshot
    #: template's, or one made for a restore): QEMU writes it instead of a temp file.
    root_snapshot: bool = True
    #: Guest RAM in a shared memfd, which vhost-user back-ends map.  A restored
    #: guest with no vhost-user device gets private RAM instead: loading a
    #: saved state reads every page, and a read of a memfd hole allocates it
    #: (all of RAM resident) where private memory maps the zero page.
    shared_memory: bool = True
    append: str = ""
    qmp_socket: str
    console_socket: str
    console_log: str
    disk_files: Mapping[str, str] = field(default_factory=dict)
    vhost_sockets: Mapping[str, str] = field(default_factory=dict)
    serial_sockets: Mapping[str, str] = field(default_factory=dict)
    #: NIC name → the unix socket its passt listens on (NICs with ``backend="passt"``).
    net_sockets: Mapping[str, str] = field(default_factory=dict)
    #: NIC name → the descriptor of its tap device, which QEMU inherits (``backend="tap"``).
    net_fds: Mapping[str, int] = field(default_factory=dict)
    name: str = "guest"
    #: fw_cfg blob name → host file (``-fw_cfg name=..,file=..``): per-launch data
    #: such as the session's SSH public key, which must not live in the shared image.
    fw_cfg: Mapping[str, str] = field(default_factory=dict)
    #: A user kernel's modules disk (read-only ext4, label ``pvmods``), attached
    #: on the root disk's bus so the initramfs's own root drivers find it.
    modules_image: str | None = None

    def __post_init__(self) -> None:
        _check_choice(self.accel, ("kvm", "tcg"), "accel")
        _check_choice(self.root_format, DISK_FORMATS, "root_format")
        for attr in ("disk_files", "vhost_sockets", "serial_sockets", "net_sockets", "net_fds",
                     "fw_cfg"):
            object.__setattr__(self, attr, _frozen_map(getattr(self, attr)))


#: The command channel's log file, in a guest's run directory.
COMMAND_LOG = "command.log"


def command_channel(console_socket: str) -> tuple[str, str]:
    """(socket, log) of a guest's command channel: beside its kernel console's.

    The kernel's console is ``ttyS0``; the shell the host's commands go to has
    ``ttyS1`` to itself (see :mod:`pytest_virtio.channels.console` for why).  Derived from
    the console socket's folder so every launch (boot, restore, reproduce) and
    the Machine that connects agree without another field to carry.
    """
    folder = PurePath(console_socket).parent
    return str(folder / "cmd.sock"), str(folder / COMMAND_LOG)


def command_channel_log(console_log: str | PurePath) -> str:
    """The command channel's log beside a console log (the one naming rule)."""
    return str(PurePath(console_log).parent / COMMAND_LOG)


def _lookup(mapping: Mapping[str, _V], key: str, what: str) -> _V:
    try:
        return mapping[key]
    except KeyError:
        raise ConfigError(
            f"LaunchContext.{what} has no entry for {key!r} (has: {_choices(sorted(mapping))})"
        ) from None


def _disk_file(disk: Disk, ctx: LaunchContext) -> str:
    if disk.name in ctx.disk_files:
        return ctx.disk_files[disk.name]
    if disk.image is not None:
        return disk.image
    return _lookup(ctx.disk_files, disk.name, "disk_files")
