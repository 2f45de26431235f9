"""NICs at run time without QEMU: the QMP arguments a hot-plugged NIC is built
into, what is refused before QEMU is asked, the guest's network state parsed, and
the one definition of the guest's network bring-up (pvinit runs it at boot,
``guest.restore_network`` sends it)."""

from __future__ import annotations

import pytest

from pytest_virtio.errors import ConfigError
from pytest_virtio.guests import nics
from pytest_virtio.guests.nics import AttachedNics
from pytest_virtio.images.recipe import DATA_DIR
from pytest_virtio.spec import MachineSpec, Nic, nic_hotplug_commands, nic_modules
from pytest_virtio.spec.parse import nic_from


def test_pvinit_brings_the_network_up_with_the_script_the_host_sends() -> None:
    pvinit = (DATA_DIR / "pvinit").read_text()
    assert nics.NET_UP_SCRIPT in pvinit
    assert nics.GUEST_ADDRESS in nics.NET_UP_SCRIPT
    assert f"via {nics.GUEST_GATEWAY}" in nics.NET_UP_SCRIPT


@pytest.mark.parametrize(("model", "driver"), [("virtio-net", "virtio-net-pci"),
                                               ("e1000", "e1000"), ("e1000e", "e1000e"),
                                               ("rtl8139", "rtl8139")])
def test_a_user_nic_is_a_netdev_then_a_device_with_the_boot_time_ids(model: str,
                                                                     driver: str) -> None:
    nic = Nic(model=model, name="hot1", hostfwd_ssh=False)
    assert nic_hotplug_commands(nic, "52:54:00:12:34:58") == [
        ("netdev_add", {"type": "user", "id": "hot1"}),
        ("device_add", {"driver": driver, "id": "hot1-dev", "netdev": "hot1",
                        "mac": "52:54:00:12:34:58"}),
    ]


def test_a_modern_virtio_nic_carries_its_transport() -> None:
    nic = Nic(name="m", hostfwd_ssh=False, transport="modern")
    _, (_, device) = nic_hotplug_commands(nic, "52:54:00:12:34:56")
    assert device["disable-legacy"] == "on" and device["disable-modern"] is False


@pytest.mark.parametrize("backend", ["passt", "tap"])
def test_a_backend_started_with_the_guest_cannot_be_hot_plugged(backend: str) -> None:
    nic = Nic(name="p", backend=backend, hostfwd_ssh=False)
    with pytest.raises(ConfigError, match=f"backend {backend!r} cannot be hot-plugged.*'user'"):
        nic_hotplug_commands(nic, "52:54:00:12:34:56")


def test_ssh_forwarding_on_a_hot_nic_is_refused_naming_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"hostfwd_ssh=True cannot be hot-plugged.*"
                                          "pass hostfwd_ssh=False"):
        nic_hotplug_commands(Nic(name="s"), "52:54:00:12:34:56")


def test_a_model_name_or_dict_becomes_a_nic_without_ssh_forwarding() -> None:
    assert nic_from("e1000", "w", "net3") == Nic(model="e1000", name="net3", hostfwd_ssh=False)
    assert nic_from({"name": "x"}, "w", "net3") == Nic(name="x", hostfwd_ssh=False)
    assert nic_from({"hostfwd_ssh": True}, "w", "n").hostfwd_ssh
    with pytest.raises(ConfigError, match=r"^w: .*'speed'"):
        nic_from({"speed": 10}, "w", "n")
    with pytest.raises(ConfigError, match=r"^w"):
        nic_from("ne2k", "w", "n")


def _attached(**macs: str) -> AttachedNics:
    return AttachedNics(dict(macs), {})


def test_prepare_names_the_nic_and_gives_it_a_mac_no_nic_has() -> None:
    spec = MachineSpec(nics=(Nic(name="net0"),))
    attached = _attached(net0="52:54:00:12:34:56")
    nic, commands = nics.prepare(spec, attached, {"net1": "s"}, "rtl8139")
    assert (nic.name, nic.mac, nic.model) == ("net2", "52:54:00:12:34:57", "rtl8139")
    assert commands[1][1]["mac"] == "52:54:00:12:34:57"
    assert commands[0][1]["id"] == "net2"


def test_prepare_refuses_a_name_or_mac_in_use_and_names_the_call() -> None:
    attached = _attached(lan="52:54:00:12:34:56")
    with pytest.raises(ConfigError, match="already has a NIC, disk or device named 'lan'"):
        nics.prepare(None, attached, {}, {"name": "lan"})
    with pytest.raises(ConfigError, match="already has a NIC, disk or device named 'd'"):
        nics.prepare(None, attached, {"d": "d"}, {"name": "d"})
    with pytest.raises(ConfigError, match="MAC 52:54:00:12:34:56 is NIC 'lan'"):
        nics.prepare(None, attached, {}, {"mac": "52:54:00:12:34:56"})
    with pytest.raises(ConfigError, match=r"^guest.hotplug_nic\(\): nic 'net0': backend 'passt'"):
        nics.prepare(None, attached, {}, {"backend": "passt"})


def test_a_virtio_nic_needs_its_transport_loaded_too() -> None:
    assert nic_modules("virtio-net") == ("virtio_pci", "virtio_net")
    assert nic_modules("rtl8139") == ("8139cp",)


BUSYBOX_STATE = """\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
3: eth1    inet 10.0.2.15/24 scope global eth1\\       valid_lft forever preferred_lft forever
route
default via 10.0.2.2 dev eth1
"""


def test_net_state_names_the_address_interface_and_the_gateway() -> None:
    assert nics.parse_net_state(BUSYBOX_STATE) == ("eth1", "10.0.2.2")
    assert nics.parse_net_state("route\n") == (None, None)
    assert nics.parse_net_state("2: eth0 inet 10.0.2.16/24 x\nroute\n") == (None, None)
