"""Host-side peers for guest network checks: a token server and an iperf3 server.

Why on the host's loopback: QEMU's user-mode network maps the guest's gateway
10.0.2.2 to the host's 127.0.0.1, so a service bound to loopback is reachable
from the guest and from nothing else — checks never send traffic anywhere but
between this host and its own guests, and need no root or bridge.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import MissingToolError, WorkloadError
from .guest import Guest
from .workloads.iperf import GUEST_GATEWAY, NetResult, iperf3_client_shell, parse_iperf3_json

__all__ = [
    "GUEST_GATEWAY",
    "LOOPBACK",
    "TokenServer",
    "guest_iperf3",
    "host_iperf3_server",
    "token_server",
]

LOOPBACK = "127.0.0.1"
#: Margin over the transfer for iperf3's connection setup and JSON (TCG is slow).
IPERF_SLACK = 20.0


@dataclass(frozen=True, slots=True)
class TokenServer:
    """A one-line TCP service on the host's loopback; the guest proves it reached it."""

    port: int
    token: str


@contextlib.contextmanager
def token_server() -> Iterator[TokenServer]:
    """Serve a random token to every client on 127.0.0.1:<kernel-chosen port>.

    A fresh random token, so a guest cannot pass by printing a cached answer.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(4)
    listener.settimeout(0.2)
    info = TokenServer(listener.getsockname()[1], secrets.token_hex(8))
    stop = threading.Event()
    thread = threading.Thread(target=_serve_token, args=(listener, info.token, stop),
                              name="pv-token-server", daemon=True)
    thread.start()
    try:
        yield info
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def _serve_token(listener: socket.socket, token: str, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        with conn, contextlib.suppress(OSError):
            conn.sendall(f"{token}\n".encode())


def _free_loopback_port() -> int:
    """A port free right now on 127.0.0.1 (iperf3 cannot be told to pick one).

    The tiny race with another process is handled by retrying the server.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def host_iperf3_server(start_timeout: float = 10.0, attempts: int = 3) -> Iterator[int]:
    """Run ``iperf3 -s -1`` on 127.0.0.1 for one client; yields its port.

    ``-1`` makes it exit after one test, so a forgotten server cannot linger;
    it is still killed on the way out.
    """
    last = ""
    for _ in range(attempts):
        port = _free_loopback_port()
        proc = _spawn_iperf3(port)
        try:
            if _wait_listening(proc, start_timeout):
                yield port
                return
            last = _drain_output(proc)
        finally:
            _stop(proc)
    raise WorkloadError(f"host iperf3 server would not start on {LOOPBACK}: {last}")


def _spawn_iperf3(port: int) -> subprocess.Popen[str]:
    argv = ["iperf3", "-s", "-B", LOOPBACK, "-p", str(port), "-1", "--forceflush"]
    try:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True)
    except FileNotFoundError as exc:
        raise MissingToolError("iperf3", "iperf3", "host side of the throughput check"
                               ) from exc


def _wait_listening(proc: subprocess.Popen[str], timeout: float) -> bool:
    """True once iperf3 printed 'Server listening' (it binds before printing)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "Server listening" in line:
            return True
        if not line and proc.poll() is not None:
            return False
    return False


def _drain_output(proc: subprocess.Popen[str]) -> str:
    with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
        out, _ = proc.communicate(timeout=2)
        return out.strip()
    return ""


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
        proc.communicate(timeout=5)


def guest_iperf3(guest: Guest, *, seconds: float = 2.0, reverse: bool = False,
                 via: str = "ssh") -> NetResult:
    """One bounded iperf3 run from the guest to a fresh host server.

    ``reverse`` makes the host send (the guest NIC's receive path); otherwise
    the guest sends.  The server is started per run because ``-1`` serves once.
    """
    with host_iperf3_server() as port:
        cmd = iperf3_client_shell(GUEST_GATEWAY, port, seconds=seconds, reverse=reverse)
        res = guest.run(cmd, timeout=guest.default_timeout() + seconds + IPERF_SLACK, via=via)
    if res.rc != 0 and not res.stdout.strip():
        raise WorkloadError(f"iperf3 in the guest failed (exit {res.rc}): {res.stderr}")
    return parse_iperf3_json(res.stdout)
