"""The host end of an iperf3 measurement: one ``iperf3 -s -1`` where the guest's gateway leads.

By default on loopback: the guest reaches it as 10.0.2.2 (:data:`~.iperf.GUEST_GATEWAY`)
through QEMU's user-mode network or passt, so no traffic leaves the machine.  A NIC on
a tap device in a network namespace of its own gives a :class:`ServerPlace` inside
that namespace instead (its address, the ``nsenter`` that puts a program there).
netcheck's quick check and the ``workload("iperf3")`` marker both use this one server.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pytest_virtio import procs
from pytest_virtio.errors import MissingToolError, WorkloadError

__all__ = ["LOOPBACK", "LOOPBACK_PLACE", "ServerPlace", "host_iperf3_server", "listening",
           "loopback_listener"]

LOOPBACK = "127.0.0.1"
_POLL = 0.05
_LISTEN = "0A"


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def loopback_listener(backlog: int = 4) -> socket.socket:
    """A TCP socket listening on 127.0.0.1 at a kernel-chosen port."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(backlog)
    return listener


@dataclass(frozen=True)
class ServerPlace:
    """Where a host-side server of a guest runs: the IPv4 address it binds, the argv
    prefix that starts a program there (empty: this host's own network), the
    descriptors that prefix needs, and how to pick a port free there."""

    address: str = LOOPBACK
    enter: tuple[str, ...] = ()
    pass_fds: tuple[int, ...] = ()
    free_port: Callable[[], int] = _free_loopback_port


#: The host's loopback, which user-mode networking and passt map the gateway to.
LOOPBACK_PLACE = ServerPlace()


@contextlib.contextmanager
def host_iperf3_server(place: ServerPlace = LOOPBACK_PLACE, start_timeout: float = 10.0,
                       attempts: int = 3) -> Iterator[int]:
    """Run ``iperf3 -s -1`` at ``place`` for one client; yields its port.

    ``-1`` makes it exit after one test, so a forgotten server cannot linger;
    it is still stopped on the way out, and it dies with pytest, even a killed
    one (:func:`pytest_virtio.procs.start`).  iperf3 cannot be told to pick a free
    port, so one is chosen here; losing it to another process in the moment
    between is retried on a new port (``attempts`` times).
    """
    tool = shutil.which("iperf3")
    if tool is None:
        raise MissingToolError("iperf3", "iperf3", "host side of the throughput check")
    last = ""
    for _ in range(attempts):
        port = place.free_port()
        argv = [*place.enter, tool, "-s", "-B", place.address, "-p", str(port), "-1"]
        with tempfile.TemporaryFile("w+") as log:
            proc = procs.start(argv, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, pass_fds=place.pass_fds)
            try:
                if _wait_listening(proc, place.address, port, start_timeout):
                    yield port
                    return
                last = _read(log)
            finally:
                procs.stop(proc, grace=5.0)
    raise WorkloadError(f"host iperf3 server would not start on {place.address}: {last}")


def _wait_listening(proc: subprocess.Popen[bytes], address: str, port: int,
                    timeout: float) -> bool:
    """True once the server listens on ``address:port``; False if it exited or time ran out.

    Read from the server's own ``/proc/<pid>/net/tcp`` (its network namespace's
    table) rather than by connecting: the one-shot server would take a probe
    connection for its one client.
    """
    table = Path(f"/proc/{proc.pid}/net/tcp")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(address, port, table):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(_POLL)
    return False


def listening(address: str, port: int, table: Path = Path("/proc/net/tcp")) -> bool:
    """Is a TCP socket in LISTEN on IPv4 ``address:port`` in ``table``?"""
    want = f"{socket.inet_aton(address)[::-1].hex().upper()}:{port:04X}"
    with contextlib.suppress(OSError):
        for line in table.read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) > 3 and cols[1] == want and cols[3] == _LISTEN:
                return True
    return False


def _read(log: IO[str]) -> str:
    log.seek(0)
    return log.read().strip()[-2000:]
