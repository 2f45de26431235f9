"""NICs at run time, seen from inside the guest: hot-plug and unplug of every NIC
model with traffic through the new NIC, the link cut and restored (QMP
``set_link``), and the address set again after a driver reload.

Two guests on the ``pc`` machine (ACPI PCI hotplug via the built-in acpiphp),
console only (no SSH: it would ride the NIC under test). The first boots with no
NIC, so each hot-plugged one is the guest's only way out: its traffic is the
NIC's. Traffic is a fresh token fetched from a host loopback server through
user-mode networking's gateway 10.0.2.2.
"""

from __future__ import annotations

import shlex

import pytest

from pytest_virtio.errors import ConfigError
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.netcheck import GUEST_GATEWAY, token_server
from pytest_virtio.spec import EXPECTED_DRIVER, NIC_MODELS, Nic


def _fetch(guest: Guest) -> str:
    """The token the guest fetched from a fresh host-side server ("" if none came)."""
    with token_server() as server:
        nc = f"busybox nc {GUEST_GATEWAY} {server.port} </dev/null"
        got = guest.run(f"timeout 15 sh -c {shlex.quote(nc)}").stdout.strip()
    return "ok" if got == server.token else got


def _carrier(guest: Guest, iface: str) -> str:
    return guest.check(f"cat /sys/class/net/{iface}/carrier").stdout.strip()


def _peripherals(guest: Guest) -> set[str]:
    return {p["name"] for p in guest.machine.qmp("qom-list", path="/machine/peripheral")}


@pytest.mark.vm()
def test_hotplug_traffic_and_unplug_every_nic_model(guest: Guest) -> None:
    for model in NIC_MODELS:
        iface = guest.hotplug_nic(model)
        name = next(iter(guest.hot_nics))
        assert guest.nic_interface(name) == iface
        assert EXPECTED_DRIVER[model] in guest.nic_drivers(name), model
        assert guest.restore_network() == iface, model
        assert _fetch(guest) == "ok", f"no traffic through hot-plugged {model} ({iface})"
        guest.unplug_nic(name)
        assert not guest.hot_nics and name not in guest.nic_macs
        assert f"{name}-dev" not in _peripherals(guest), model
        assert iface not in guest.check("ls /sys/class/net").stdout.split(), model
        with pytest.raises(ConfigError, match=f"no NIC named {name!r}"):
            guest.nic_interface(name)


@pytest.mark.vm(nics=[Nic(name="lan", hostfwd_ssh=False)])
def test_link_off_on_and_network_restored_after_driver_reload(guest: Guest) -> None:
    iface = guest.nic_interface("lan")
    assert _carrier(guest, iface) == "1"
    guest.set_link("lan", False)
    assert _carrier(guest, iface) == "0"
    guest.set_link("lan", True)
    assert _carrier(guest, iface) == "1"
    assert _fetch(guest) == "ok", "no traffic after the link came back"

    guest.check("rmmod virtio_net && /sbin/modprobe virtio_net")
    iface = guest.nic_interface("lan")
    assert "10.0.2.15" not in guest.check(f"/bin/busybox ip -4 addr show dev {iface}").stdout
    assert guest.restore_network() == iface
    assert _fetch(guest) == "ok", "no traffic after restore_network()"


@pytest.mark.vm(nics=[Nic(name="lan", hostfwd_ssh=False), Nic(name="old", model="e1000",
                                                             hostfwd_ssh=False)])
def test_negotiated_features_and_offloads_are_readable_and_offloads_settable(
        guest: Guest) -> None:
    """tp-qemu's ethtool checks through the public API: what virtio-net negotiated with
    QEMU 7.2's device (virtio 1.2 §5.1.3, §6), and an offload switched off and on."""
    features = guest.nic_features("lan")
    for name in ("VERSION_1", "MRG_RXBUF", "CTRL_VQ", "RING_EVENT_IDX", "RING_INDIRECT_DESC",
                 "MAC", "STATUS"):
        assert name in features, sorted(features.names)
    # User-mode networking has no virtio-net header, so QEMU offers no checksum or
    # segmentation offload (why tap or passt show what virtio-net can do); one queue
    # pair, so no MQ.
    for name in ("CSUM", "GUEST_CSUM", "HOST_TSO4", "GUEST_TSO4", "MQ"):
        assert name not in features, sorted(features.names)
    iface = guest.nic_interface("lan")
    assert guest.nic_offloads("lan")["tcp-segmentation-offload"] is False
    assert guest.nic_offloads("lan")["generic-receive-offload"] is True
    guest.check(f"ethtool -K {iface} gro off")
    assert guest.nic_offloads("lan")["generic-receive-offload"] is False
    guest.check(f"ethtool -K {iface} gro on")
    assert guest.nic_offloads("lan")["generic-receive-offload"] is True
    with pytest.raises(ConfigError, match=r"NIC 'old' \(\w+\) has no virtio feature bits"):
        guest.nic_features("old")
    assert "rx-checksumming" in guest.nic_offloads("old")  # e1000's, through ethtool too
