"""NICs at run time: hot-plug and unplug (QMP ``netdev_add``/``device_add``,
``device_del``/``netdev_del``), the link as the guest sees it (QMP ``set_link``
on the NIC's device), and the guest's address and route set again after a
driver reload, by the very commands the guest's init runs at boot.

:class:`AttachedNics` is the guest's own bookkeeping (shared dicts, not copies),
as :class:`.hotplug.AttachedDisks` is for disks: every NIC the guest has now by
MAC, so ``guest.nic_interface(name)`` finds a hot-plugged NIC as it finds a
booted one.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from pytest_virtio import ids
from pytest_virtio import spec as spec_mod
from pytest_virtio.channels.features import Features, parse_features, parse_offloads
from pytest_virtio.errors import ConfigError, GuestError, VirtioError
from pytest_virtio.guests import drivers
from pytest_virtio.guests.hotplug import free_name, qmp_once_released, send_or_undo, wait_qom_gone
from pytest_virtio.guests.passt import GUEST_ADDRESS as GUEST_IP
from pytest_virtio.guests.passt import GUEST_PREFIX
from pytest_virtio.guests.shell import Shell
from pytest_virtio.qemu.machine import Machine
from pytest_virtio.spec.parse import nic_from
from pytest_virtio.workloads.iperf import GUEST_GATEWAY

__all__ = ["GUEST_ADDRESS", "GUEST_GATEWAY", "NET_UP_SCRIPT", "AttachedNics", "attach", "detach",
           "features", "offloads", "restore_network", "set_link"]

log = logging.getLogger(__name__)

_POLL = 0.2

#: The guest's address with its prefix, as ``ip -o -4 addr`` shows it (the same on
#: every backend: QEMU's user-mode defaults, which passt and tap give it too).
GUEST_ADDRESS: Final = f"{GUEST_IP}/{GUEST_PREFIX}"

#: What the guest's init (``images/data/pvinit``) runs at boot to bring the
#: network up, character for character (tests/unit/test_nics.py holds pvinit to
#: it): coldplug the network-class PCI functions' drivers, every interface up,
#: the address and default route on the first.  Kept here rather than in a guest
#: script of its own because a changed guest file changes every image's key.
#: Run by busybox's shell, as at boot (its ``ip`` is an applet there).
NET_UP_SCRIPT: Final = """\
mods=pvpanic-mmio
for d in /sys/bus/pci/devices/*; do
    [ -r "$d/class" ] && read -r class < "$d/class" || continue
    case $class in 0x02*) ;; *) continue ;; esac
    read -r alias < "$d/modalias" || continue
    mods="$mods $alias"
    case $alias in pci:v00001AF4*) mods="$mods virtio_net" ;; esac
done
/sbin/modprobe -q -a $mods 2>/dev/null
first=""
for i in /sys/class/net/*; do
    i=${i##*/}
    [ "$i" = lo ] || [ "$i" = "*" ] && continue
    ip link set "$i" up
    [ -z "$first" ] && first=$i
done
if [ -n "$first" ]; then
    ip addr add 10.0.2.15/24 dev "$first"
    ip route add default via 10.0.2.2
fi
"""

#: Which interface holds the address, and the default route's gateway.
_NET_STATE: Final = ("/bin/busybox ip -o -4 addr show; echo route; "
                     "/bin/busybox ip route show default")


@dataclass(frozen=True, slots=True)
class AttachedNics:
    """A guest's NICs now: the MAC of each by name (booted and hot-plugged) and
    the hot-plugged ones (with the MAC they were given)."""

    macs: dict[str, str]
    hot: dict[str, spec_mod.Nic]


def _taken_names(spec: spec_mod.MachineSpec | None, nics: AttachedNics,
                 disks: Mapping[str, str]) -> set[str]:
    """Every name the guest's NICs, disks and devices have now."""
    items = (*spec.disks, *spec.devices) if spec is not None else ()
    return {*nics.macs, *disks, *(item.name for item in items)}


def free_mac(nics: AttachedNics) -> str:
    """The first MAC of the boot-time series (by position) no NIC of the guest has."""
    used = set(nics.macs.values())
    return next(mac for i in range(len(used) + 1)
                if (mac := spec_mod.nic_mac(spec_mod.Nic(), i)) not in used)


def prepare(spec: spec_mod.MachineSpec | None, nics: AttachedNics, disks: Mapping[str, str],
            item: spec_mod.Nic | Mapping[str, Any] | str,
            ) -> tuple[spec_mod.Nic, list[tuple[str, dict[str, Any]]]]:
    """The NIC to hot-plug (its MAC fixed) and its QMP commands; ConfigError for a
    name in use or a NIC that cannot be hot-plugged. Pure: nothing is sent."""
    taken = _taken_names(spec, nics, disks)
    nic = nic_from(item, "guest.hotplug_nic(nic)", free_name("net", taken))
    if nic.name in taken:
        raise ConfigError(f"guest.hotplug_nic(): the guest already has a NIC, disk or device "
                          f"named {nic.name!r}; name the NIC otherwise")
    nic = replace(nic, mac=nic.mac or free_mac(nics))
    if nic.mac in nics.macs.values():
        raise ConfigError(f"guest.hotplug_nic(): MAC {nic.mac} is NIC "
                          f"{next(n for n, m in nics.macs.items() if m == nic.mac)!r}'s already")
    with _errors_under_call():
        commands = spec_mod.nic_hotplug_commands(nic, nic.mac or "")
    return nic, commands


@contextlib.contextmanager
def _errors_under_call() -> Any:
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"guest.hotplug_nic(): {exc}") from None


def attach(machine: Machine, shell: Shell, nics: AttachedNics, spec: spec_mod.MachineSpec | None,
           disks: Mapping[str, str], owner: str,
           item: spec_mod.Nic | Mapping[str, Any] | str, timeout: float) -> str:
    """Hot-add NIC ``item`` through QMP, load its driver and bring its interface up;
    returns the guest's interface name. On a refusal what was added is taken back."""
    nic, commands = prepare(spec, nics, disks, item)
    log.info("%s: hot-plugging NIC %s (%s, %s)", owner, nic.name, nic.model, nic.mac)

    def undo(done: list[str]) -> None:
        if "netdev_add" in done:
            with contextlib.suppress(VirtioError, OSError):
                machine.qmp("netdev_del", id=nic.name)

    send_or_undo(machine, commands, undo)
    nics.macs[nic.name] = nic.mac or ""
    nics.hot[nic.name] = nic
    drivers.modprobe(shell, spec_mod.nic_modules(nic.model))
    iface = _wait_interface(shell, nic.mac or "", nic.name, present=True, timeout=timeout)
    shell.check(f"/bin/busybox ip link set {shlex.quote(iface)} up")
    return iface


def detach(machine: Machine, shell: Shell, nics: AttachedNics, owner: str, name: str,
           timeout: float) -> None:
    """Hot-remove NIC ``name`` (hot-plugged or booted); returns once QEMU let its
    device and netdev go and the guest's interface is gone."""
    _check_known(nics.macs, name, "unplug_nic")
    device = ids.nic_device_id(name)
    log.info("%s: unplugging NIC %s", owner, name)
    mark = len(machine.events)
    machine.qmp("device_del", id=device)
    machine.wait_event("DEVICE_DELETED", timeout, {"device": device}, since=mark)
    wait_qom_gone(machine, shell, device, timeout)
    qmp_once_released(machine, timeout, "netdev_del", id=name)
    _wait_interface(shell, nics.macs[name], name, present=False, timeout=timeout)
    del nics.macs[name]
    nics.hot.pop(name, None)


def set_link(machine: Machine, shell: Shell, macs: Mapping[str, str], name: str, up: bool,
             timeout: float) -> None:
    """QMP ``set_link`` on NIC ``name``'s device; returns once the guest's carrier
    says so (``/sys/class/net/<if>/carrier``), unless its interface is down
    (the kernel reports no carrier then: the guest sees the link when it is up)."""
    _check_known(macs, name, "set_link")
    iface = drivers.nic_interface(shell, macs, name)
    log.info("QMP set_link %s (%s) up=%s", name, iface, up)
    machine.qmp("set_link", name=ids.nic_device_id(name), up=up)
    want = "1" if up else "0"
    read = f"cat /sys/class/net/{shlex.quote(iface)}/carrier 2>/dev/null || echo down"
    deadline = time.monotonic() + timeout
    while (seen := shell.check(read).stdout.strip()) not in (want, "down"):
        if time.monotonic() > deadline:
            raise GuestError(f"NIC {name!r} ({iface}): carrier still {seen} {timeout:.0f}s "
                             f"after set_link up={up}", shell.console_tail())
        time.sleep(_POLL)


def _check_known(macs: Mapping[str, str], name: str, call: str) -> None:
    if name not in macs:
        raise ConfigError(f"guest.{call}(): no NIC named {name!r} "
                          f"(have: {', '.join(sorted(macs)) or 'none'})")


def features(shell: Shell, iface: str, name: str) -> Features:
    """The feature bits interface ``iface``'s virtio driver negotiated (its virtio
    device's sysfs ``features``); a ConfigError for a NIC that is not virtio."""
    path = shlex.quote(f"/sys/class/net/{iface}/device/features")
    res = shell.run(f"cat {path}")
    if not res.ok:
        raise ConfigError(f"NIC {name!r} ({iface}) has no virtio feature bits: it is not a "
                          f"virtio-net device ({res.stderr.strip()})")
    return parse_features(res.stdout)


def offloads(shell: Shell, iface: str, name: str) -> dict[str, bool]:
    """``ethtool -k`` of interface ``iface``: each offload and whether it is on."""
    res = shell.run(f"ethtool -k {shlex.quote(iface)}")
    if res.rc == 127:
        raise GuestError("ethtool is not in the guest image (Debian package ethtool): "
                         f"cannot read NIC {name!r}'s offloads", shell.console_tail())
    res.check(shell.console_tail())
    return parse_offloads(res.stdout)


def restore_network(shell: Shell, timeout: float) -> str:
    """Run the guest's boot-time network bring-up again (:data:`NET_UP_SCRIPT`), as
    after ``rmmod virtio_net; modprobe virtio_net``; returns the interface that
    holds 10.0.2.15/24, once it and the default route via 10.0.2.2 are there.

    An address or route still in place is left as it is (the script's ``ip``
    refuses to add it twice, harmlessly)."""
    shell.run(f"/bin/busybox sh -c {shlex.quote(NET_UP_SCRIPT)}", timeout=timeout)
    iface, gateway = parse_net_state(shell.check(_NET_STATE).stdout)
    if iface is None or gateway != GUEST_GATEWAY:
        raise GuestError(f"guest network not restored: address {GUEST_ADDRESS} on "
                         f"{iface or 'no interface'}, default route via {gateway or 'none'}",
                         shell.console_tail())
    return iface


def parse_net_state(out: str) -> tuple[str | None, str | None]:
    """(interface holding :data:`GUEST_ADDRESS`, default gateway) from :data:`_NET_STATE`'s
    output (busybox ``ip -o -4 addr show``, ``route``, ``ip route show default``)."""
    lines = out.splitlines()
    cut = lines.index("route") if "route" in lines else len(lines)
    addrs, routes = lines[:cut], lines[cut + 1:]
    iface = next((f[1] for f in map(str.split, addrs)
                  if len(f) > 3 and f[2] == "inet" and f[3] == GUEST_ADDRESS), None)
    gateway = next((f[2] for f in map(str.split, routes)
                    if len(f) > 2 and f[:2] == ["default", "via"]), None)
    return iface, gateway


def _wait_interface(shell: Shell, mac: str, name: str, *, present: bool,
                    timeout: float) -> str:
    """Poll /sys/class/net until an interface has ``mac`` (its name) or none has ("")."""
    deadline = time.monotonic() + timeout
    while True:
        iface = drivers.interfaces_by_mac(shell).get(mac, "")
        if bool(iface) == present:
            return iface
        if time.monotonic() > deadline:
            state = "appear" if present else "go away"
            raise GuestError(f"guest interface with MAC {mac} (NIC {name!r}) did not {state} "
                             f"within {timeout:.0f}s", shell.console_tail())
        time.sleep(_POLL)
