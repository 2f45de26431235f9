"""tap: a NIC's frames on a tap device in a network namespace of its own
(``Nic(backend="tap")``, root only).

QEMU's user-mode network and passt both carry every frame through a userspace
TCP/IP stack, which caps every NIC model near the same speed; a tap device hands
QEMU's frames to the kernel as they are, so the NIC model is the bottleneck again.
Per NIC, before QEMU starts:

- a new network namespace, made by ``unshare(CLONE_NEWNET)`` on a short-lived
  thread of this process and held by a descriptor of ours (``/proc/thread-self/
  ns/net``), not by a process: nothing to reap, and it goes when that descriptor
  closes (the guest closes, or pytest dies, even by SIGKILL) and the processes in
  it (QEMU's tap, the iperf3 servers, each started by :func:`procs.start`) are gone;
- in it, a tap device ``pvtap0`` (``TUNSETIFF``: IFF_TAP, no packet info, with
  virtio-net headers so QEMU can pass offloads) whose descriptor QEMU inherits
  (``-netdev tap,fd=N``): QEMU itself stays in the host's namespace, so QMP, the
  other NICs' user-mode forwards and every socket are as on any other guest;
- the namespace's end of the tap is 10.0.2.2/24, the gateway pvinit gives the guest
  (10.0.2.15/24 on its first NIC, as on user-mode networking): the image needs no
  change.  Its loopback is up;
- the guest's host-side peers live in the namespace: the iperf3 server runs there
  (``nsenter --net=/proc/self/fd/N``), the token server's socket and SSH's
  connection are made there (a thread that entered it with ``setns``; a socket
  stays in the namespace it was made in).  Nothing listens on any host address.

Making a namespace and a tap device needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)
and ``/dev/net/tun``; without either, :func:`start_tap` is a ConfigError naming it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from pytest_virtio.channels.ssh import SshEndpoint
from pytest_virtio.errors import ConfigError, LaunchError
from pytest_virtio.guests.passt import GUEST_ADDRESS, GUEST_PREFIX
from pytest_virtio.qemu.machine import Machine
from pytest_virtio.spec import Nic
from pytest_virtio.tools import require_tool
from pytest_virtio.workloads.iperf import GUEST_GATEWAY
from pytest_virtio.workloads.iperf_server import ServerPlace

__all__ = ["HOST_ADDRESS", "TAP_NAME", "TUN", "Netns", "Tap", "netns_holders", "start_tap"]

log = logging.getLogger(__name__)

#: The namespace's end of the tap: the guest's gateway.
HOST_ADDRESS: Final = GUEST_GATEWAY
#: The tap device's name inside its namespace (one per namespace, so one name).
TAP_NAME: Final = "pvtap0"
TUN: Final = Path("/dev/net/tun")
_CLONE_NEWNET: Final = 0x40000000
_TUNSETIFF: Final = 0x400454CA
_IFF_TAP: Final = 0x0002
_IFF_NO_PI: Final = 0x1000
_IFF_VNET_HDR: Final = 0x4000
_SSH_PORT: Final = 22

_T = TypeVar("_T")


def _libc_call(name: str, *args: int) -> None:
    """A libc call that returns -1 and sets errno on failure (``unshare``, ``setns``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _on_own_thread(fn: Callable[[], _T]) -> _T:
    """``fn()`` on a new thread, which then ends; its result, or its exception raised here.

    A namespace change by ``unshare``/``setns`` is the calling thread's alone, so
    it is made on a thread that lives for this one call and never runs anything else.
    """
    box: dict[str, _T] = {}
    failed: list[BaseException] = []

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="pytest-virtio-netns", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return box["result"]


@dataclass
class Netns:
    """A network namespace held by one descriptor of this process (``fd``)."""

    fd: int
    #: Its inode: how ``/proc/<pid>/ns/net`` and ``/proc/<pid>/fd`` links name it.
    inode: int = field(init=False)

    def __post_init__(self) -> None:
        self.inode = os.fstat(self.fd).st_ino

    @classmethod
    def create(cls) -> Netns:
        """A new, empty network namespace (loopback down)."""
        def make() -> int:
            _libc_call("unshare", _CLONE_NEWNET)
            return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        return cls(_on_own_thread(make))

    def run(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` inside the namespace (a thread that entered it; programs it starts
        and sockets it makes are in the namespace too)."""
        def entered() -> _T:
            _libc_call("setns", self.fd, _CLONE_NEWNET)
            return fn()
        return _on_own_thread(entered)

    def enter_argv(self) -> tuple[str, ...]:
        """The argv prefix that runs a program in the namespace; the program's
        Popen needs ``pass_fds=(self.fd,)``."""
        nsenter = require_tool("nsenter", "util-linux", "it starts programs in a tap's namespace")
        return (nsenter, f"--net=/proc/self/fd/{self.fd}")

    def close(self) -> None:
        """Let the namespace go (once nothing else holds it); idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Tap:
    """One NIC's tap device and the namespace it lives in (see the module doc)."""

    nic: str
    netns: Netns
    #: The tap's descriptor: QEMU inherits it (``-netdev tap,fd=N``).
    fd: int

    @property
    def net_socket(self) -> str | None:
        return None

    @property
    def net_fd(self) -> int | None:
        return self.fd

    def ssh_endpoint(self, machine: Machine, nic: Nic) -> SshEndpoint:
        """Connections to the guest's port 22 made inside the namespace (no port on
        this host leads there); ``port`` only names the pinned host key."""
        return SshEndpoint(_SSH_PORT, dial=self._dial,
                           where=f"{GUEST_ADDRESS}:{_SSH_PORT} in nic {self.nic!r}'s "
                                 "network namespace")

    def _dial(self, timeout: float) -> socket.socket:
        return self.netns.run(lambda: socket.create_connection((GUEST_ADDRESS, _SSH_PORT),
                                                               timeout))

    def server_place(self) -> ServerPlace:
        """Where the guest's iperf3 server runs: in the namespace, on the gateway."""
        return ServerPlace(address=HOST_ADDRESS, enter=self.netns.enter_argv(),
                           pass_fds=(self.netns.fd,), free_port=self._free_port)

    def listener(self, backlog: int = 4) -> socket.socket:
        """A TCP socket listening on the gateway, inside the namespace."""
        def listen() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST_ADDRESS, 0))
            sock.listen(backlog)
            return sock
        return self.netns.run(listen)

    def _free_port(self) -> int:
        def pick() -> int:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((HOST_ADDRESS, 0))
                return int(s.getsockname()[1])
        return self.netns.run(pick)

    def close(self) -> None:
        """Close our descriptors of the tap and the namespace; both vanish once QEMU
        and the namespace's processes are gone too.  Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.netns.close()
        log.debug("tap of nic %s closed", self.nic)


def start_tap(nic: Nic, run_dir: Path) -> Tap:
    """NIC ``nic``'s namespace and tap, the namespace's end addressed and up."""
    why = f"nic {nic.name!r} has backend='tap'"
    _check_can_tap(why)
    ip = require_tool("ip", "iproute2", why)
    try:
        netns = Netns.create()
    except PermissionError as exc:
        raise ConfigError(f"{why}, which needs a network namespace, and this process may "
                          f"not make one ({exc}); run as root with CAP_SYS_ADMIN, or use "
                          "backend='passt' (no privileges)") from None
    try:
        fd = netns.run(lambda: _make_tap(ip))
    except BaseException:
        netns.close()
        raise
    log.info("nic %s: tap %s in network namespace net:[%d], %s/%d (guest %s)", nic.name,
             TAP_NAME, netns.inode, HOST_ADDRESS, GUEST_PREFIX, GUEST_ADDRESS)
    return Tap(nic=nic.name, netns=netns, fd=fd)


def _check_can_tap(why: str) -> None:
    if os.geteuid() != 0:
        raise ConfigError(f"{why}, which needs root (a network namespace and a tap device "
                          f"in it) and {TUN}; run pytest as root, or use backend='passt' "
                          "(no privileges)")
    if not TUN.exists():
        raise ConfigError(f"{why}, which needs {TUN}, and this host has none: load the "
                          "tun module (modprobe tun) or use backend='passt'")


def _make_tap(ip: str) -> int:
    """In the namespace: the tap, its address and the links up; its descriptor."""
    fd = os.open(TUN, os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", TAP_NAME.encode(), flags))
        for args in (("link", "set", "lo", "up"),
                     ("addr", "add", f"{HOST_ADDRESS}/{GUEST_PREFIX}", "dev", TAP_NAME),
                     ("link", "set", TAP_NAME, "up")):
            done = subprocess.run([ip, *args], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise LaunchError(f"ip {' '.join(args)} in a tap's namespace failed "
                                  f"(exit {done.returncode}): {done.stderr.strip()}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def netns_holders(inode: int, proc: Path = Path("/proc")) -> list[str]:
    """What keeps network namespace ``net:[inode]`` alive: ``<pid>`` for a process in
    it, ``<pid>/fd/<n>`` for a descriptor of it.  Empty: the namespace is gone."""
    name = f"net:[{inode}]"
    return [*_members(proc, name), *_descriptors(proc, name)]


def _members(proc: Path, name: str) -> Iterator[str]:
    for pid in _pids(proc):
        with contextlib.suppress(OSError):
            if os.readlink(proc / pid / "ns" / "net") == name:
                yield pid


def _descriptors(proc: Path, name: str) -> Iterator[str]:
    for pid in _pids(proc):
        with contextlib.suppress(OSError):
            for fd in os.listdir(proc / pid / "fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(proc / pid / "fd" / fd) == name:
                        yield f"{pid}/fd/{fd}"


def _pids(proc: Path) -> list[str]:
    return [p for p in os.listdir(proc) if p.isdigit()]
