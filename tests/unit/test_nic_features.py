"""virtio-net's negotiated feature bits and ethtool's offloads, parsed; the room's errors
for a NIC that is not virtio and a guest without ethtool."""

from __future__ import annotations

import pytest
from scripted_shell import ScriptedShell

from pytest_virtio.channels.features import parse_features, parse_offloads
from pytest_virtio.errors import ConfigError, GuestError
from pytest_virtio.guests import nics


def _bits(*on: int) -> str:
    return "".join("1" if i in on else "0" for i in range(64))


def test_feature_bits_are_named_by_the_spec_bit_0_first() -> None:
    # A Linux 6.1 guest on QEMU 7.2's virtio-net-pci: checksum and TSO both ways,
    # mergeable buffers, the control queue, event index, VERSION_1.
    f = parse_features(_bits(0, 1, 7, 11, 15, 16, 17, 29, 32) + "\n")
    assert f.bits == frozenset({0, 1, 7, 11, 15, 16, 17, 29, 32})
    assert {"CSUM", "GUEST_CSUM", "GUEST_TSO4", "HOST_TSO4", "MRG_RXBUF", "STATUS",
            "CTRL_VQ", "RING_EVENT_IDX", "VERSION_1"} == f.names
    assert "MQ" not in f and "MRG_RXBUF" in f


def test_a_bit_without_a_name_is_kept_by_number() -> None:
    assert parse_features(_bits(4, 41)).names == {"BIT4", "BIT41"}


@pytest.mark.parametrize("text", ["", "01x0", "cat: no such file"])
def test_anything_but_a_bit_string_is_an_error(text: str) -> None:
    with pytest.raises(GuestError, match="not a virtio features string"):
        parse_features(text)


ETHTOOL_K = """Features for eth0:
rx-checksumming: on [fixed]
tx-checksumming: on
\ttx-checksum-ipv4: off [fixed]
\ttx-checksum-ip-generic: on
tcp-segmentation-offload: off
generic-receive-offload: on
rx-vlan-filter: on [fixed]
"""


def test_offloads_are_on_or_off_and_fixed_ones_too() -> None:
    assert parse_offloads(ETHTOOL_K) == {
        "rx-checksumming": True, "tx-checksumming": True, "tx-checksum-ipv4": False,
        "tx-checksum-ip-generic": True, "tcp-segmentation-offload": False,
        "generic-receive-offload": True, "rx-vlan-filter": True}


def test_output_with_no_offload_is_an_error() -> None:
    with pytest.raises(GuestError, match="no offload"):
        parse_offloads("Cannot get device features: Operation not supported\n")


def test_an_e1000_has_no_virtio_feature_bits() -> None:
    shell = ScriptedShell(rc=1)
    with pytest.raises(ConfigError, match=r"NIC 'n1' \(eth1\) has no virtio feature bits"):
        nics.features(shell, "eth1", "n1")
    assert shell.commands == ["cat /sys/class/net/eth1/device/features"]


def test_a_guest_without_ethtool_names_the_package() -> None:
    with pytest.raises(GuestError, match=r"Debian package ethtool"):
        nics.offloads(ScriptedShell(rc=127), "eth0", "net0")
