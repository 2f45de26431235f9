"""What a guest's virtio-net driver negotiated and which offloads its interface has on:
the guest's sysfs ``features`` file and ``ethtool -k``, parsed (issue 27 item 3).

Why both: the feature bits are the contract between the driver and the device
(virtio 1.2 §2.2; the device's bits in §5.1.3, the reserved transport bits in
§6), fixed at the driver's probe; the offloads are what the kernel does with it
now, and a test (or tp-qemu's ethtool checks) can change them at run time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from pytest_virtio.errors import GuestError

__all__ = ["NET_FEATURES", "TRANSPORT_FEATURES", "Features", "parse_features", "parse_offloads"]

#: virtio-net's feature bits, virtio 1.2 §5.1.3 (6 is the legacy GSO bit).
NET_FEATURES: Final[Mapping[int, str]] = {
    0: "CSUM", 1: "GUEST_CSUM", 2: "CTRL_GUEST_OFFLOADS", 3: "MTU", 5: "MAC", 6: "GSO",
    7: "GUEST_TSO4", 8: "GUEST_TSO6", 9: "GUEST_ECN", 10: "GUEST_UFO", 11: "HOST_TSO4",
    12: "HOST_TSO6", 13: "HOST_ECN", 14: "HOST_UFO", 15: "MRG_RXBUF", 16: "STATUS",
    17: "CTRL_VQ", 18: "CTRL_RX", 19: "CTRL_VLAN", 20: "CTRL_RX_EXTRA", 21: "GUEST_ANNOUNCE",
    22: "MQ", 23: "CTRL_MAC_ADDR", 52: "VQ_NOTF_COAL", 53: "NOTF_COAL", 54: "GUEST_USO4",
    55: "GUEST_USO6", 56: "HOST_USO", 57: "HASH_REPORT", 59: "GUEST_HDRLEN", 60: "RSS",
    61: "RSC_EXT", 62: "STANDBY", 63: "SPEED_DUPLEX",
}
#: Bits every device type shares, virtio 1.2 §6 (24 and 27 are legacy-only).
TRANSPORT_FEATURES: Final[Mapping[int, str]] = {
    24: "NOTIFY_ON_EMPTY", 27: "ANY_LAYOUT", 28: "RING_INDIRECT_DESC", 29: "RING_EVENT_IDX",
    32: "VERSION_1", 33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER",
    36: "ORDER_PLATFORM", 37: "SR_IOV", 38: "NOTIFICATION_DATA", 39: "NOTIF_CONFIG_DATA",
    40: "RING_RESET",
}


@dataclass(frozen=True)
class Features:
    """A virtio device's negotiated feature bits, with the names the spec gives them
    (``VIRTIO_NET_F_`` and ``VIRTIO_F_`` dropped); a bit without a name is ``BIT<n>``."""

    bits: frozenset[int]
    names: frozenset[str]

    def __contains__(self, name: object) -> bool:
        return name in self.names


def parse_features(text: str, device: Mapping[int, str] = NET_FEATURES) -> Features:
    """The sysfs ``features`` file: one ``0``/``1`` per bit, bit 0 first (the Linux
    driver core writes it so); GuestError on anything else."""
    flags = text.strip()
    if not flags or set(flags) - {"0", "1"}:
        raise GuestError(f"not a virtio features string: {text[:80]!r}")
    bits = frozenset(i for i, flag in enumerate(flags) if flag == "1")
    names = {**TRANSPORT_FEATURES, **device}
    return Features(bits, frozenset(names.get(b, f"BIT{b}") for b in bits))


def parse_offloads(text: str) -> dict[str, bool]:
    """``ethtool -k IF``'s ``name: on|off [fixed]`` lines → {name: on}; its header
    line (``Features for eth0:``) is skipped.  GuestError when no line parsed."""
    offloads: dict[str, bool] = {}
    for line in text.splitlines():
        name, sep, rest = line.strip().partition(": ")
        state = rest.split(" ", 1)[0]
        if sep and state in ("on", "off"):
            offloads[name] = state == "on"
    if not offloads:
        raise GuestError(f"no offload in ethtool -k's output: {text[:200]!r}")
    return offloads
