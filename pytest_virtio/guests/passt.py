"""passt: a NIC's network backend in its own process (``Nic(backend="passt")``).

QEMU's user-mode network (slirp) copies every frame through a TCP/IP stack inside
QEMU's own process, and caps every NIC model at the same few hundred Mbit/s under
TCG; a bandwidth test then measures slirp.  Debian's ``passt`` translates the
guest's frames to host sockets in a process of its own, which QEMU 7.2 reaches
with ``-netdev stream`` over a unix socket.  One passt per NIC, started before QEMU:

- the guest keeps what pvinit gives it on user-mode networking: 10.0.2.15/24
  behind gateway 10.0.2.2 (``-a``/``-n``/``-g``); passt maps TCP to the gateway
  onto the host's loopback, so the iperf3 and token servers on 127.0.0.1 work as
  they do on slirp;
- SSH: ``-t 127.0.0.1/PORT:22`` and nothing else (``-u none``, IPv4 only): no
  socket on any host address but loopback.  passt cannot take port 0, so a free
  port is chosen here; one another process takes in the moment between makes
  passt exit with "Failed to bind", and a new port is tried (xdist-safe);
- ``-f`` keeps it in the foreground (its PID is the one :func:`procs.start`
  gave the death signal), and ``--runas`` our own uid:gid: passt started as root
  otherwise switches to ``nobody``, a change of credentials after which the
  kernel forgets the death signal (prctl(2)), and a SIGKILLed pytest would leave
  it running.  It still drops every capability and seccomp-filters itself;
- its log (``--log-file``: timestamped, at most 1 MiB; it says the same on stderr,
  and tries syslog) is ``passt-<nic>.log`` in the guest's run directory, kept with
  the guest's artifacts; each start truncates it, so it tells the last attempt.

passt has one queue pair (``Nic`` refuses ``queues>1``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pytest_virtio import ids, procs
from pytest_virtio.channels.ssh import SshEndpoint
from pytest_virtio.errors import LaunchError
from pytest_virtio.qemu.machine import Machine
from pytest_virtio.spec import Nic
from pytest_virtio.tools import require_tool
from pytest_virtio.workloads.iperf import GUEST_GATEWAY
from pytest_virtio.workloads.iperf_server import LOOPBACK_PLACE, ServerPlace, loopback_listener

__all__ = ["GUEST_ADDRESS", "GUEST_PREFIX", "Passt", "accepting", "listeners", "passt_argv",
           "passt_log", "start_passt"]

log = logging.getLogger(__name__)

#: The guest's address and prefix length: what pvinit sets on its first NIC.
GUEST_ADDRESS: Final = "10.0.2.15"
GUEST_PREFIX: Final = 24
#: The Debian package that ships the ``passt`` program.
PACKAGE: Final = "passt"
#: The line passt logs when another process holds the SSH port it was given.
_BIND_FAILED: Final = "Failed to bind"
#: ``/proc/net/unix`` flag of a listening socket (``__SO_ACCEPTCON``).
_ACCEPTING: Final = 0x10000
_POLL: Final = 0.02
#: (``Passt.socket``, its unix socket's path, hides the module in the class body.)
_Socket = socket.socket


@dataclass(frozen=True, slots=True)
class Passt:
    """One NIC's running passt: its process, the socket QEMU connects to, its log,
    and the loopback port it forwards to the guest's SSH (None: no forward)."""

    nic: str
    proc: subprocess.Popen[Any]
    socket: Path
    log: Path
    ssh_port: int | None

    @property
    def net_socket(self) -> str | None:
        """The unix socket QEMU's ``-netdev stream`` connects to."""
        return str(self.socket)

    @property
    def net_fd(self) -> int | None:
        return None

    def ssh_endpoint(self, machine: Machine, nic: Nic) -> SshEndpoint:
        """The loopback port passt forwards to the guest's port 22."""
        if self.ssh_port is None:
            raise LaunchError(f"nic {self.nic!r}: its passt forwards no SSH port")
        return SshEndpoint(self.ssh_port)

    def server_place(self) -> ServerPlace:
        """The host's loopback: passt maps the gateway onto it."""
        return LOOPBACK_PLACE

    def listener(self, backlog: int = 4) -> _Socket:
        """A listener on the host's loopback (the gateway, as passt maps it)."""
        return loopback_listener(backlog)

    def close(self) -> None:
        """Stop passt (SIGTERM, then SIGKILL) and remove its socket; idempotent."""
        rc = procs.stop(self.proc, grace=2.0)
        log.debug("passt of nic %s stopped (exit %s)", self.nic, rc)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


def passt_log(run_dir: Path, nic: str) -> Path:
    """Where NIC ``nic``'s passt writes its log."""
    return run_dir / f"passt-{nic}.log"


def passt_argv(tool: str, sock: str, ssh_port: int | None) -> list[str]:
    """passt in the foreground, as our own user, giving the guest 10.0.2.15/24 behind
    10.0.2.2, listening on ``sock``; TCP ``ssh_port`` on 127.0.0.1 to guest port 22."""
    forward = "none" if ssh_port is None else f"127.0.0.1/{ssh_port}:22"
    return [tool, "--foreground", "--ipv4-only", "--runas", f"{os.geteuid()}:{os.getegid()}",
            "--address", GUEST_ADDRESS, "--netmask", str(GUEST_PREFIX),
            "--gateway", GUEST_GATEWAY, "--tcp-ports", forward, "--udp-ports", "none",
            "--socket", sock]


def start_passt(nic: Nic, run_dir: Path, *, timeout: float = 10.0, attempts: int = 3) -> Passt:
    """Start NIC ``nic``'s passt and wait until its socket accepts; a LaunchError naming
    the NIC and passt's own words otherwise (a lost SSH port is retried ``attempts`` times)."""
    why = f"nic {nic.name!r} has backend='passt'"
    tool = require_tool("passt", PACKAGE, why)
    sock = run_dir / ids.passt_socket_name(nic.name)
    said = ""
    for _ in range(attempts):
        port = _free_loopback_port() if nic.hostfwd_ssh else None
        started = _launch(tool, nic.name, sock, passt_log(run_dir, nic.name), port, timeout)
        if isinstance(started, Passt):
            return started
        said = started
        if _BIND_FAILED not in said:
            break
        log.info("nic %s: loopback port %s was taken before passt bound it; another", nic.name,
                 port)
    raise LaunchError(f"{why}, but passt did not start: {said or 'no output'} "
                      f"(its log: {passt_log(run_dir, nic.name)})")


def _launch(tool: str, nic: str, sock: Path, log_path: Path, port: int | None,
            timeout: float) -> Passt | str:
    """One passt; the running Passt, or what it said before it exited or timed out."""
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    proc = procs.start([*passt_argv(tool, str(sock), port), "--log-file", str(log_path)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    passt = Passt(nic=nic, proc=proc, socket=sock, log=log_path, ssh_port=port)
    try:
        ready = _wait_accepting(proc, sock, timeout)
    except BaseException:  # ^C while it starts: not in start_nets' list yet, stop it here
        passt.close()
        raise
    if ready:
        log.info("passt %d serves nic %s at %s (ssh: 127.0.0.1:%s)", proc.pid, nic, sock, port)
        return passt
    exited = proc.poll()
    passt.close()
    if exited is None:
        return f"no listening socket at {sock} after {timeout:g}s; it said: {_tail(log_path)}"
    return f"exit {exited}: {_tail(log_path)}"


def _wait_accepting(proc: subprocess.Popen[Any], sock: Path, timeout: float) -> bool:
    """True once ``sock`` is a listening unix socket (passt binds the forwarded TCP
    port before it); False if passt exited or time ran out.  Read from
    /proc/net/unix, because a probe connection would be passt's one client."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if accepting(sock):
            return True
        time.sleep(_POLL)
    return False


def accepting(sock: Path, table: Path = Path("/proc/net/unix")) -> bool:
    """Is a socket listening at path ``sock`` (per ``/proc/net/unix``)?"""
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        cols = line.split(None, 7)  # the path is the rest of the line, spaces and all
        if len(cols) >= 8 and cols[7] == str(sock) and int(cols[3], 16) & _ACCEPTING:
            return True
    return False


def listeners(pid: int, proc: Path = Path("/proc")) -> list[tuple[str, str, int]]:
    """Every inet socket process ``pid`` listens on: ``(protocol, address, port)`` for
    each TCP socket in LISTEN and each UDP socket, IPv4 and IPv6 (from its fds and
    ``/proc/net``).  Reading another user's non-dumpable process's fds needs root."""
    inodes = {link[8:-1] for fd in (proc / str(pid) / "fd").iterdir()
              if (link := _readlink(fd)).startswith("socket:[")}
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(OSError):
            for line in (proc / str(pid) / "net" / table).read_text().splitlines()[1:]:
                cols = line.split()
                listening = table.startswith("udp") or cols[3] == "0A"
                if cols[9] in inodes and listening:
                    found.append((table, *_address(cols[1])))
    return found


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _address(hex_addr: str) -> tuple[str, int]:
    """``0100007F:1F90`` (or a 32-digit IPv6 address) → ``("127.0.0.1", 8080)``."""
    addr, port = hex_addr.split(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words), int(port, 16)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line for line in text.strip()[-limit:].splitlines() if line.strip())
