"""The host end of an iperf3 measurement: one ``iperf3 -s -1`` on loopback.

Loopback only: the guest reaches it as 10.0.2.2 (:data:`~.iperf.GUEST_GATEWAY`)
through QEMU user-mode networking, so no traffic leaves the machine.  netcheck's
quick check and the ``workload("iperf3")`` marker both use this one server
(they had one each, with different readiness checks and error types).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pytest_virtio import procs
from pytest_virtio.errors import MissingToolError, WorkloadError

__all__ = ["LOOPBACK", "host_iperf3_server"]

LOOPBACK = "127.0.0.1"
_POLL = 0.05


@contextlib.contextmanager
def host_iperf3_server(start_timeout: float = 10.0, attempts: int = 3) -> Iterator[int]:
    """Run ``iperf3 -s -1`` on 127.0.0.1 for one client; yields its port.

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
        port = _free_loopback_port()
        with tempfile.TemporaryFile("w+") as log:
            proc = procs.start([tool, "-s", "-B", LOOPBACK, "-p", str(port), "-1"],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                if _wait_listening(proc, port, start_timeout):
                    yield port
                    return
                last = _read(log)
            finally:
                procs.stop(proc, grace=5.0)
    raise WorkloadError(f"host iperf3 server would not start on {LOOPBACK}: {last}")


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """True once the port is in LISTEN; False if iperf3 exited or time ran out.

    Read from /proc/net/tcp rather than by connecting: the one-shot server
    would take a probe connection for its one client.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _listening(port):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(_POLL)
    return False


def _listening(port: int) -> bool:
    want = f"0100007F:{port:04X}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) > 3 and cols[1] == want and cols[3] == "0A":
                return True
    return False


def _read(log: IO[str]) -> str:
    log.seek(0)
    return log.read().strip()[-2000:]

