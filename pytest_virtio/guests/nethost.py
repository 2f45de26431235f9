"""The host side of each NIC, per network backend: the one place that decides.

A NIC's backend (``Nic.backend``) decides what QEMU's netdev is connected to and
where the guest's host-side peers live.  Everything else asks a :class:`NicHost`:

===========  ==========================  ==========================  ===========================
backend      QEMU reaches                 peers (iperf3, token)        SSH
===========  ==========================  ==========================  ===========================
``user``     its own slirp                the host's 127.0.0.1         QEMU's hostfwd on loopback
``passt``    passt's unix socket          the host's 127.0.0.1         passt's forward on loopback
``tap``      a tap fd it inherits         the NIC's own namespace      a connection made in it
===========  ==========================  ==========================  ===========================

The guest sees the same either way: 10.0.2.15/24 behind gateway 10.0.2.2 (pvinit,
on its first NIC), and its peers at 10.0.2.2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final, Protocol

from pytest_virtio.channels.ssh import SshEndpoint
from pytest_virtio.channels.sshtrust import parse_hostfwd_port
from pytest_virtio.errors import ConfigError
from pytest_virtio.guests.passt import start_passt
from pytest_virtio.guests.tap import start_tap
from pytest_virtio.qemu.machine import Machine
from pytest_virtio.spec import LaunchContext, MachineSpec, Nic
from pytest_virtio.workloads.iperf_server import LOOPBACK_PLACE, ServerPlace, loopback_listener

__all__ = ["RESTORE_REFUSAL", "NicHost", "UserNet", "host_of", "net_links", "start_nets",
           "stop_nets"]

log = logging.getLogger(__name__)


class NicHost(Protocol):
    """The host side of one NIC (see the module doc)."""

    @property
    def net_socket(self) -> str | None:
        """The unix socket QEMU's netdev connects to (passt), else None."""
        ...

    @property
    def net_fd(self) -> int | None:
        """The descriptor QEMU's netdev inherits (tap), else None."""
        ...

    def ssh_endpoint(self, machine: Machine, nic: Nic) -> SshEndpoint:
        """Where SSH reaches the guest's port 22 through this NIC."""
        ...

    def server_place(self) -> ServerPlace:
        """Where the guest's iperf3 server runs."""
        ...

    def listener(self, backlog: int = 4) -> socket.socket:
        """A TCP socket listening where the guest reaches it as 10.0.2.2."""
        ...

    def close(self) -> None: ...


class UserNet:
    """QEMU's user-mode network: nothing runs on the host; peers on loopback."""

    net_socket: Final = None
    net_fd: Final = None

    def ssh_endpoint(self, machine: Machine, nic: Nic) -> SshEndpoint:
        """The loopback port QEMU's user-mode stack chose (``info usernet``)."""
        return SshEndpoint(parse_hostfwd_port(machine.hmp("info usernet"), 22, nic.name))

    def server_place(self) -> ServerPlace:
        return LOOPBACK_PLACE

    def listener(self, backlog: int = 4) -> socket.socket:
        return loopback_listener(backlog)

    def close(self) -> None:
        pass


#: The user-mode NICs' host side (stateless, shared).
_USER: Final = UserNet()

#: Each backend's start: the NIC's host side, made before QEMU.
_STARTS: Final[Mapping[str, Callable[[Nic, Path], NicHost]]] = MappingProxyType(
    {"user": lambda nic, run_dir: _USER, "passt": start_passt, "tap": start_tap})

#: Why a guest with such a NIC cannot be saved as a snapshot template.
RESTORE_REFUSAL: Final[Mapping[str, str]] = MappingProxyType({
    "passt": "its passt process and socket cannot follow a restore",
    "tap": "its network namespace and tap device cannot follow a restore",
})


def start_nets(spec: MachineSpec, run_dir: Path) -> dict[str, NicHost]:
    """Every NIC's host side, by NIC name; all or none."""
    started: dict[str, NicHost] = {}
    try:
        for nic in spec.nics:
            started[nic.name] = _STARTS[nic.backend](nic, run_dir)
    except BaseException:
        stop_nets(started)
        raise
    return started


def net_links(ctx: LaunchContext, nets: Mapping[str, NicHost]) -> LaunchContext:
    """``ctx`` with what QEMU's netdevs need: ``net_sockets`` and ``net_fds``."""
    return dataclasses.replace(
        ctx, net_sockets={n: h.net_socket for n, h in nets.items() if h.net_socket is not None},
        net_fds={n: h.net_fd for n, h in nets.items() if h.net_fd is not None})


def stop_nets(nets: Mapping[str, NicHost]) -> None:
    """Stop every NIC's host side (each even if another fails to)."""
    for host in nets.values():
        with contextlib.suppress(OSError):
            host.close()


def host_of(nets: Mapping[str, NicHost], spec: MachineSpec, nic: str | None = None) -> NicHost:
    """NIC ``nic``'s host side; without a name, the first NIC's (the one pvinit
    addresses, whose gateway the guest's default route uses)."""
    if not spec.nics:
        raise ConfigError("the guest has no NIC: add one, e.g. vm(nics=[Nic()])")
    name = spec.nics[0].name if nic is None else nic
    if name in nets:
        return nets[name]
    backend = next((n.backend for n in spec.nics if n.name == name), None)
    if backend == "user":  # stateless: a restored guest carries none
        return _USER
    raise ConfigError(f"the guest has no NIC {name!r} with a host side "
                      f"(has: {', '.join(n.name for n in spec.nics)})")
