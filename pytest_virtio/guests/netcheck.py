"""Host-side peers for guest network checks: a token server and an iperf3 server.

Where a peer runs is the guest's first NIC's host side to say
(:mod:`pytest_virtio.guests.nethost`): on user-mode networking and passt the
host's loopback (the guest's gateway 10.0.2.2 maps to 127.0.0.1), on a tap the
NIC's own network namespace (10.0.2.2 is the namespace's end of the tap).  Either
way the peer is reachable from the guest and from nothing else: checks never send
traffic anywhere but between this host and its own guests.
"""

from __future__ import annotations

import contextlib
import secrets
import shlex
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from pytest_virtio.errors import GuestError, WorkloadError
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.nethost import host_of
from pytest_virtio.workloads.iperf import (
    GUEST_GATEWAY,
    NetResult,
    iperf3_client_shell,
    parse_iperf3_json,
)
from pytest_virtio.workloads.iperf_server import LOOPBACK, host_iperf3_server, loopback_listener

__all__ = [
    "GUEST_GATEWAY",
    "LOOPBACK",
    "TokenServer",
    "fetch_token",
    "guest_iperf3",
    "host_iperf3_server",
    "iperf3_both_ways",
    "token_server",
]

#: Margin over the transfer for iperf3's connection setup and JSON (TCG is slow).
IPERF_SLACK = 20.0


@dataclass(frozen=True, slots=True)
class TokenServer:
    """A one-line TCP service on the host's loopback; the guest proves it reached it."""

    port: int
    token: str


@contextlib.contextmanager
def token_server(listener: socket.socket | None = None) -> Iterator[TokenServer]:
    """Serve a random token to every client of ``listener`` (a listening socket this
    takes over; default: 127.0.0.1 at a kernel-chosen port).

    A fresh random token, so a guest cannot pass by printing a cached answer.
    """
    listener = loopback_listener() if listener is None else listener
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


def guest_iperf3(guest: Guest, *, seconds: float = 2.0, reverse: bool = False,
                 via: str = "ssh") -> NetResult:
    """One bounded iperf3 run from the guest to a fresh host server.

    ``reverse`` makes the host send (the guest NIC's receive path); otherwise
    the guest sends.  The server is started per run because ``-1`` serves once.
    """
    place = host_of(guest.nets, guest.spec).server_place()
    with host_iperf3_server(place) as port:
        cmd = iperf3_client_shell(GUEST_GATEWAY, port, seconds=seconds, reverse=reverse)
        res = guest.run(cmd, timeout=guest.default_timeout() + seconds + IPERF_SLACK, via=via)
    if res.rc != 0 and not res.stdout.strip():
        raise WorkloadError(f"iperf3 in the guest failed (exit {res.rc}): {res.stderr}")
    return parse_iperf3_json(res.stdout)


def fetch_token(guest: Guest, *, hold: float = 0.0, via: str = "ssh") -> None:
    """The guest fetches a fresh token from its first NIC's host-side peer through
    its gateway (the host's loopback, or a tap's namespace).

    ``hold`` is how long the guest keeps its side of the connection open: 0
    closes it at once (``</dev/null``), which a network backend must handle; an
    old passt can lose the host's close when the guest's crosses it, so its check
    holds a while.  A wrong or missing token is a GuestError with what came back.
    """
    with token_server(host_of(guest.nets, guest.spec).listener()) as server:
        nc = f"busybox nc {GUEST_GATEWAY} {server.port}"
        nc = f"sleep {hold:g} | {nc}" if hold > 0 else f"{nc} </dev/null"
        got = guest.check(f"timeout 20 sh -c {shlex.quote(nc)}", via=via).stdout
    if got.strip() != server.token:
        raise GuestError(f"the guest did not reach its host-side peer through "
                         f"{GUEST_GATEWAY}: expected the token {server.token!r}, got {got!r}")


def iperf3_both_ways(guest: Guest, *, seconds: float = 2.0,
                     via: str = "ssh") -> tuple[NetResult, NetResult]:
    """(guest→host, host→guest) iperf3 runs; a direction that moved nothing is an error."""
    tx = guest_iperf3(guest, seconds=seconds, via=via)
    rx = guest_iperf3(guest, seconds=seconds, reverse=True, via=via)
    for direction, res in (("guest→host", tx), ("host→guest", rx)):
        if res.bytes <= 0 or res.bits_per_second <= 0:
            raise WorkloadError(f"iperf3 {direction} moved nothing: {res}")
    return tx, rx
