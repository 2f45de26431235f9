"""The guest's rooms (pytest_virtio/guests/{power,memory,media,ports,drivers,hotplug,nics}.py)
without QEMU: what each refuses before touching QEMU, what it sends, and how it waits.

The guest's side is scripted: a shell answering commands from a table and a machine
recording QMP commands. The same calls on real guests are tests/integration
(test_poweroff, test_balloon, test_cdrom, test_serial, test_hotplug, test_api_gaps).
"""

from __future__ import annotations

import hashlib
import logging
import shlex
from pathlib import Path
from typing import Any, cast

import pytest
from scripted_shell import ScriptedShell

from pytest_virtio.channels import inventory
from pytest_virtio.errors import CommandFailed, ConfigError, GuestError, GuestTimeout, QmpError
from pytest_virtio.guests import drivers, hotplug, media, memory, nics, ports, power
from pytest_virtio.qemu.machine import Machine
from pytest_virtio.spec import ROOT_MODULES, Disk, MachineSpec, Nic, spec_from_kwargs


class ScriptedMachine:
    """QMP recorded; ``wait_exit`` says the QEMU exited after ``exits_after`` waits."""

    name = "g"
    pid = 1

    def __init__(self, exits_after: int | None = None) -> None:
        self.qmp_calls: list[tuple[str, dict[str, Any]]] = []
        self.exits_after = exits_after
        self.waits = 0
        self.events: list[dict[str, Any]] = []

    def qmp(self, cmd: str, **args: Any) -> Any:
        self.qmp_calls.append((cmd, args))
        return {}

    def wait_exit(self, timeout: float) -> int | None:
        self.waits += 1
        return 0 if self.exits_after is not None and self.waits > self.exits_after else None


def _m(machine: ScriptedMachine) -> Machine:
    return cast(Machine, machine)


# --------------------------------------------------------------------------- power


def test_poweroff_returns_once_qemu_exits(caplog: pytest.LogCaptureFixture) -> None:
    machine, shell = ScriptedMachine(exits_after=2), ScriptedShell()
    with caplog.at_level(logging.INFO, logger="pytest_virtio.guests.power"):
        power.poweroff(_m(machine), shell, "g", timeout=10.0)
    assert shell.commands == [power.POWEROFF_SCRIPT] and machine.waits == 3
    assert "powering off" in caplog.text and "powered off" in caplog.text


def test_poweroff_that_fails_in_the_guest_is_an_error_at_once() -> None:
    tail = f"booting\n{power.POWEROFF_FAILED}: '/bin/busybox poweroff -f' exited 1\n"
    machine = ScriptedMachine()
    with pytest.raises(GuestError, match=r"could not power off: .*exited 1"):
        power.poweroff(_m(machine), ScriptedShell(tail=tail), "g", timeout=30.0)
    assert machine.waits == 1


def test_poweroff_without_a_way_fails_before_waiting() -> None:
    machine = ScriptedMachine()
    with pytest.raises(CommandFailed):
        power.poweroff(_m(machine), ScriptedShell(rc=127), "g", timeout=30.0)
    assert machine.waits == 0


def test_poweroff_that_never_comes_times_out() -> None:
    with pytest.raises(GuestTimeout, match="did not power off within 0s"):
        power.poweroff(_m(ScriptedMachine()), ScriptedShell(), "g", timeout=0.01)


class RebootConsole:
    """The console side of a restart: the new boot's shell answers, or never does."""

    def __init__(self, ready: bool = True) -> None:
        self.ready = ready
        self.calls: list[str] = []

    def begin_reboot(self) -> None:
        self.calls.append("begin_reboot")

    def wait_ready(self, timeout: float) -> float:
        self.calls.append("wait_ready")
        if not self.ready:
            raise GuestTimeout(f"guest did not answer within {timeout:.0f}s while booting")
        return 1.5


def _rebooting(console: RebootConsole) -> ScriptedMachine:
    machine = ScriptedMachine()
    machine.console = console  # type: ignore[attr-defined]
    return machine


def test_restart_allows_one_reboot_then_forbids_it_again() -> None:
    machine = _rebooting(RebootConsole())
    assert power.restart(_m(machine), "g", 10.0, lambda: machine.qmp("system_reset")) == 1.5
    assert machine.qmp_calls == [("set-action", {"reboot": "reset"}), ("system_reset", {}),
                                 ("set-action", {"reboot": "shutdown"})]


@pytest.mark.parametrize("fails", ["trigger", "new boot"])
def test_a_failed_restart_still_forbids_reboots_again(fails: str) -> None:
    """-no-reboot's rule is back after a reboot that could not start (the guest's reboot
    command failed) or whose boot never answered: a later stray reboot ends QEMU."""
    console = RebootConsole(ready=fails != "new boot")
    machine = _rebooting(console)
    shell = ScriptedShell(rc=127 if fails == "trigger" else 0)
    with pytest.raises(CommandFailed if fails == "trigger" else GuestTimeout):
        power.restart(_m(machine), "g", 0.01, lambda: shell.check(power.REBOOT_SCRIPT))
    assert machine.qmp_calls[-1] == ("set-action", {"reboot": "shutdown"})
    # A reboot that never began leaves the console as it was (no boot watch armed
    # over the running boot's kernel lines).
    assert console.calls == ([] if fails == "trigger" else ["begin_reboot", "wait_ready"])


# --------------------------------------------------------------------------- memory


def test_no_balloon_is_refused_before_qmp_and_before_the_size() -> None:
    machine = ScriptedMachine()
    for spec in (None, MachineSpec()):
        with pytest.raises(ConfigError, match=r"no balloon: add devices=\['balloon'\]"):
            memory.balloon(_m(machine), spec, "not a size", 1.0, lambda: "")
    assert machine.qmp_calls == []


def test_balloon_device_and_a_bad_target_named() -> None:
    spec = spec_from_kwargs({"devices": ["balloon"]})
    assert memory.balloon_device(spec) == spec.devices[0].name
    machine = ScriptedMachine()
    with pytest.raises(ConfigError, match=r"guest.balloon\(target\)"):
        memory.balloon(_m(machine), spec, "-1M", 1.0, lambda: "")
    assert machine.qmp_calls == []


# --------------------------------------------------------------------------- media


def test_unknown_cdrom_is_refused_naming_the_drives(tmp_path: Path) -> None:
    iso = tmp_path / "x.iso"
    iso.write_bytes(bytes(40 * 2048))
    spec = spec_from_kwargs({"devices": [{"kind": "cdrom", "name": "cd0", "iso": str(iso)}]})
    machine = ScriptedMachine()
    with pytest.raises(ConfigError, match=r"cdrom_eject\('cd9'\): no CD-ROM .* has: cd0"):
        media.eject(_m(machine), spec, "cd9", force=False)
    with pytest.raises(ConfigError, match="has: none"):
        media.change(_m(machine), ScriptedShell(), None, "cd0", iso, force=False, timeout=1.0)
    assert machine.qmp_calls == []
    media.eject(_m(machine), spec, "cd0", force=True)
    assert [c for c, _ in machine.qmp_calls] == ["blockdev-open-tray", "blockdev-remove-medium"]


def test_volume_digest_is_sector_16(tmp_path: Path) -> None:
    iso = tmp_path / "x.iso"
    pvd = b"\x01CD001" + bytes(2048 - 6)
    iso.write_bytes(bytes(16 * 2048) + pvd + bytes(2048))
    assert media.volume_digest(iso) == hashlib.md5(pvd, usedforsecurity=False).hexdigest()


# --------------------------------------------------------------------------- ports


def test_unknown_serial_port_names_the_ports() -> None:
    with pytest.raises(ConfigError, match=r"no such virtio-serial port; this guest has: none "
                                          r"\(add devices=\['serial'\]"):
        ports.serial_port({}, "p")
    port = object()
    with pytest.raises(ConfigError, match="has: a, b"):
        ports.serial_port(cast(Any, {"a": port, "b": port}), "p")
    assert ports.serial_port(cast(Any, {"a": port}), "a") is port


# --------------------------------------------------------------------------- drivers


def test_disk_modules_follow_the_disk_bus() -> None:
    spec = MachineSpec(disks=(Disk(name="d", bus="ahci"),))
    assert drivers.disk_modules(spec, "d") == ROOT_MODULES["ahci"]
    assert drivers.disk_modules(spec, "other") == () and drivers.disk_modules(None, "d") == ()


def test_modprobe_of_nothing_runs_nothing() -> None:
    shell = ScriptedShell()
    assert drivers.modprobe(shell, ()) is None and shell.commands == []
    drivers.modprobe(shell, ["virtio_blk", "a b"])
    assert shell.commands == ["modprobe -a virtio_blk 'a b'"]


def test_nic_interface_is_matched_by_mac() -> None:
    spec = MachineSpec(nics=(Nic(name="n0"), Nic(name="n1")))
    shell = ScriptedShell({"/sys/class/net": "lo 00:00:00:00:00:00\n"
                                              "eth0 52:54:00:12:34:56\neth1 52:54:00:12:34:57\n"})
    macs = drivers.nic_macs(spec)
    assert drivers.nic_interface(shell, macs, "n1") == "eth1"
    with pytest.raises(ConfigError, match="no NIC named 'n9'"):
        drivers.nic_interface(shell, macs, "n9")
    with pytest.raises(GuestError, match="no guest interface has MAC 52:54:00:12:34:56"):
        drivers.nic_interface(ScriptedShell({"/sys/class/net": "lo 0\n"}), macs, "n0")


def test_find_disk_loads_the_driver_once_then_finds_the_serial() -> None:
    loads: list[int] = []
    shell = ScriptedShell({inventory.BLOCK_SCRIPT: lambda: "vda root\nsdb DATA\n" if loads
                           else "vda root\n"})
    assert drivers.find_disk(shell, "DATA", "data", 5.0, lambda: loads.append(1)) == "/dev/sdb"
    assert loads == [1]


# --------------------------------------------------------------------------- hotplug


def _disks(serials: dict[str, str] | None = None) -> hotplug.AttachedDisks:
    return hotplug.AttachedDisks(dict(serials or {}), {}, {})


def test_free_disk_name_skips_every_name_the_guest_uses() -> None:
    spec = spec_from_kwargs({"disks": [{"name": "disk0"}], "nics": [{"name": "disk1"}]})
    assert hotplug.free_disk_name(spec, {"disk0": "disk0", "disk2": "x"}) == "disk3"
    assert hotplug.free_disk_name(None, {}) == "disk0"


def test_data_disk_knows_booted_and_hot_plugged_disks() -> None:
    spec = MachineSpec(disks=(Disk(name="d"),))
    disks = _disks({"d": "d", "h": "h"})
    disks.hot["h"] = Disk(name="h", bus="virtio-scsi")
    assert hotplug.data_disk(spec, disks, "d", "resize_disk").name == "d"
    assert hotplug.data_disk(spec, disks, "h", "resize_disk").bus == "virtio-scsi"
    with pytest.raises(ConfigError, match=r"resize_disk\('x'\): no data disk .* has: d, h"):
        hotplug.data_disk(spec, disks, "x", "resize_disk")


def test_attach_refuses_a_taken_name_or_no_context_before_qmp(tmp_path: Path) -> None:
    machine = ScriptedMachine()
    with pytest.raises(ConfigError, match="a disk named 'd' is already attached"):
        hotplug.attach(_m(machine), _disks({"d": "d"}), None, None, tmp_path, "guest 'g'",
                       {"name": "d"})
    with pytest.raises(GuestError, match="needs the guest's LaunchContext"):
        hotplug.attach(_m(machine), _disks(), None, None, tmp_path, "guest 'g'", "virtio-blk")
    assert machine.qmp_calls == []


def test_detach_of_an_unknown_disk_names_the_disks_before_qmp() -> None:
    machine = ScriptedMachine()
    with pytest.raises(ConfigError, match=r"no data disk named 'x' \(have: a, b\)"):
        hotplug.detach(_m(machine), ScriptedShell(), _disks({"b": "b", "a": "a"}), "guest 'g'",
                       "x", 1.0)
    assert machine.qmp_calls == []


# --------------------------------------------------------------------------- nics

_NET = {"/sys/class/net/*": "lo 00:00:00:00:00:00\neth0 52:54:00:12:34:56\n"}


def test_set_link_sends_the_nic_device_and_waits_for_the_guest_carrier() -> None:
    carriers = iter(["1", "1", "0"])
    shell = ScriptedShell({**_NET, "/carrier": lambda: next(carriers)})
    machine = ScriptedMachine()
    nics.set_link(_m(machine), shell, {"lan": "52:54:00:12:34:56"}, "lan", False, 10.0)
    assert machine.qmp_calls == [("set_link", {"name": "lan-dev", "up": False})]
    assert sum("eth0/carrier" in c for c in shell.commands) == 3


def test_set_link_that_the_guest_never_sees_times_out_naming_the_nic() -> None:
    shell = ScriptedShell({**_NET, "/carrier": "1"})
    with pytest.raises(GuestError, match=r"NIC 'lan' \(eth0\): carrier still 1 .*up=False"):
        nics.set_link(_m(ScriptedMachine()), shell, {"lan": "52:54:00:12:34:56"}, "lan",
                      False, 0.01)


def test_set_link_on_a_down_interface_does_not_wait() -> None:
    shell = ScriptedShell({**_NET, "/carrier": "down"})
    nics.set_link(_m(ScriptedMachine()), shell, {"lan": "52:54:00:12:34:56"}, "lan", True, 0.0)


def test_set_link_and_unplug_of_an_unknown_nic_send_nothing() -> None:
    machine = ScriptedMachine()
    with pytest.raises(ConfigError, match=r"set_link\(\): no NIC named 'x' \(have: lan\)"):
        nics.set_link(_m(machine), ScriptedShell(), {"lan": "m"}, "x", True, 1.0)
    with pytest.raises(ConfigError, match=r"unplug_nic\(\): no NIC named 'x' \(have: lan\)"):
        nics.detach(_m(machine), ScriptedShell(), nics.AttachedNics({"lan": "m"}, {}),
                    "guest 'g'", "x", 1.0)
    assert machine.qmp_calls == []


class RefusingMachine(ScriptedMachine):
    """QEMU refuses ``device_add`` (the netdev before it was added)."""

    def qmp(self, cmd: str, **args: Any) -> Any:
        super().qmp(cmd, **args)
        if cmd == "device_add":
            raise QmpError(cmd, args, "GenericError", "Bus 'pci.0' does not support hotplugging")
        return {}


def test_a_refused_nic_hotplug_takes_its_netdev_back_and_records_nothing() -> None:
    machine, attached = RefusingMachine(), nics.AttachedNics({}, {})
    with pytest.raises(QmpError, match="does not support hotplugging"):
        nics.attach(_m(machine), ScriptedShell(), attached, None, {}, "guest 'g'", "e1000", 1.0)
    assert [c for c, _ in machine.qmp_calls] == ["netdev_add", "device_add", "netdev_del"]
    assert machine.qmp_calls[-1][1] == {"id": "net0"}
    assert attached == nics.AttachedNics({}, {})


def test_a_hot_nic_is_recorded_its_driver_loaded_and_its_interface_brought_up() -> None:
    machine, attached = ScriptedMachine(), nics.AttachedNics({}, {})
    shell = ScriptedShell({"/sys/class/net/*": "eth0 52:54:00:12:34:56\n"})
    assert nics.attach(_m(machine), shell, attached, None, {}, "guest 'g'", "e1000", 1.0) == "eth0"
    assert attached.macs == {"net0": "52:54:00:12:34:56"} and attached.hot["net0"].model == "e1000"
    assert "modprobe -a e1000" in shell.commands
    assert shell.commands[-1] == "/bin/busybox ip link set eth0 up"


def test_restore_network_runs_the_boot_script_and_names_the_address_interface() -> None:
    state = ("3: eth1    inet 10.0.2.15/24 scope global eth1\nroute\n"
             "default via 10.0.2.2 dev eth1\n")
    shell = ScriptedShell({"ip -o -4 addr": state})
    assert nics.restore_network(shell, 5.0) == "eth1"
    assert shell.commands[0] == f"/bin/busybox sh -c {shlex.quote(nics.NET_UP_SCRIPT)}"


def test_restore_network_that_leaves_no_address_says_what_it_found() -> None:
    shell = ScriptedShell({"ip -o -4 addr": "route\n"})
    with pytest.raises(GuestError, match=r"15/24 on no interface, default route via none"):
        nics.restore_network(shell, 5.0)


def test_a_refused_disk_hotplug_takes_its_block_node_back() -> None:
    machine = RefusingMachine()
    disk = Disk(name="d", bus="virtio-blk", size="8M")
    commands = [("blockdev-add", {"node-name": disk.drive_id}), ("device_add", {"id": "d"})]
    disks = hotplug.AttachedDisks({}, {}, {})
    with pytest.raises(QmpError, match="does not support hotplugging"):
        hotplug._send(_m(machine), disks, "guest 'g'", disk, commands)
    assert [c for c, _ in machine.qmp_calls] == ["blockdev-add", "device_add", "blockdev-del"]
    assert machine.qmp_calls[-1][1] == {"node-name": disk.drive_id}
