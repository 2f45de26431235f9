"""iperf3: network throughput between the host and a guest's virtio-net/e1000 NIC.

The client side is built here (the host's server is workloads.iperf_server).
``-J`` makes iperf3 print one JSON document, which is what we parse.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pytest_virtio.errors import ConfigError, WorkloadError
from pytest_virtio.workloads.fio import extract_json_object

__all__ = ["GUEST_GATEWAY", "IperfJob", "NetResult", "iperf3_client_shell", "parse_iperf3_json"]

#: The host as the guest sees it on QEMU user-mode networking (slirp forwards it
#: to the host's loopback); the one definition netcheck and guests.measure use.
GUEST_GATEWAY = "10.0.2.2"

_HOST_RE = re.compile(r"^[A-Za-z0-9.:_-]+$")


@dataclass(frozen=True)
class NetResult:
    """Throughput as the receiver saw it, plus the sender's TCP retransmits.

    The receiver's numbers, because bytes the sender pushed into a socket
    buffer that never arrived are not throughput.  ``retransmits`` is ``None``
    for UDP or when the sender's OS does not report it.
    """

    bits_per_second: float
    bytes: int
    seconds: float
    retransmits: int | None


def _check_seconds(seconds: object) -> float:
    if (isinstance(seconds, bool) or not isinstance(seconds, int | float)
            or not math.isfinite(seconds) or seconds <= 0):
        raise ConfigError(f"iperf3: seconds={seconds!r} must be a positive number")
    return float(seconds)


@dataclass(frozen=True)
class IperfJob:
    """One iperf3 client run, as data: ``seconds`` long (stored as a float),
    ``reverse`` makes the host's server send.  Validated at construction."""

    seconds: float = 3.0
    reverse: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "seconds", _check_seconds(self.seconds))
        object.__setattr__(self, "reverse", bool(self.reverse))


def iperf3_client_shell(
    host: str, port: int = 5201, seconds: float = 5, reverse: bool = False
) -> str:
    """``iperf3 -c HOST -p PORT -t SECONDS -J [-R]``; ``reverse`` makes the server send."""
    if not _HOST_RE.match(host):
        raise ConfigError(f"iperf3: host={host!r} is not a host name or address")
    if isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(f"iperf3: port={port!r} must be 1..65535")
    _check_seconds(seconds)
    words = ["iperf3", "-c", host, "-p", str(port), "-t", f"{seconds:g}", "-J"]
    if reverse:
        words.append("-R")
    return shlex.join(words)


def _summary(end: Mapping[str, Any]) -> Mapping[str, Any]:
    """TCP reports ``sum_received``; UDP has a single ``sum``."""
    for key in ("sum_received", "sum"):
        value = end.get(key)
        if isinstance(value, Mapping) and value.get("seconds"):
            return value
    raise WorkloadError("iperf3 JSON has no end.sum_received / end.sum summary")


def parse_iperf3_json(text: str) -> NetResult:
    """iperf3 ``-J`` output → :class:`NetResult`; iperf3's ``error`` raises WorkloadError."""
    _before, data, _after = extract_json_object(text, required_key="end", what="iperf3")
    if data.get("error"):
        raise WorkloadError(f"iperf3 failed: {data['error']}")
    end = data.get("end")
    if not isinstance(end, Mapping):
        raise WorkloadError("iperf3 JSON has no 'end' section")
    summary = _summary(end)
    sent = end.get("sum_sent")
    retransmits = sent.get("retransmits") if isinstance(sent, Mapping) else None
    return NetResult(
        bits_per_second=float(summary.get("bits_per_second", 0.0)),
        bytes=int(summary.get("bytes", 0)),
        seconds=float(summary["seconds"]),
        retransmits=int(retransmits) if retransmits is not None else None,
    )
