"""Disks added and removed while the guest runs: QMP ``blockdev-add``/``device_add``
(a vhost-user-blk disk's in-process backend started first), ``device_del`` and the
release of its node or chardev, and the waits until the guest's kernel shows the
disk, or no longer does.

:class:`AttachedDisks` is the guest's own bookkeeping (shared dicts, not copies):
a room call updates the guest as it goes, so a failure half-way leaves it true.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_virtio import ids
from pytest_virtio import spec as spec_mod
from pytest_virtio.errors import ConfigError, GuestError, QmpError, VirtioError
from pytest_virtio.guests import drivers, launch
from pytest_virtio.guests.shell import Shell
from pytest_virtio.guests.teardown import stop_backends
from pytest_virtio.qemu.machine import Machine
from pytest_virtio.spec.parse import disk_from

if TYPE_CHECKING:
    from pytest_virtio.vhost_user.server import VhostUserBlkServer

__all__ = ["AttachedDisks", "attach", "data_disk", "detach", "free_disk_name", "free_name",
           "qmp_once_released", "send_or_undo", "wait_block", "wait_qom_gone"]

log = logging.getLogger(__name__)

#: QEMU's refusals to free a backend its (unplugged, not yet finalized) device holds.
_STILL_HELD = re.compile(r"is in use|is busy")
_POLL = 0.2


@dataclass(frozen=True, slots=True)
class AttachedDisks:
    """A guest's data disks now: serials by name (booted and hot-plugged), the
    hot-plugged disks, and the in-process backends by disk name."""

    serials: dict[str, str]
    hot: dict[str, spec_mod.Disk]
    backends: dict[str, VhostUserBlkServer]


def free_disk_name(spec: spec_mod.MachineSpec | None, serials: Mapping[str, str]) -> str:
    """``disk<i>`` for the first ``i`` no disk, NIC or device of the guest is called."""
    items = (*spec.disks, *spec.nics, *spec.devices) if spec is not None else ()
    return free_name("disk", {*serials, *(item.name for item in items)})


def free_name(prefix: str, taken: Collection[str]) -> str:
    """``<prefix><i>`` for the first ``i`` that is not in ``taken`` (disks and NICs)."""
    return next(f"{prefix}{i}" for i in range(len(taken) + 1) if f"{prefix}{i}" not in taken)


def data_disk(spec: spec_mod.MachineSpec | None, disks: AttachedDisks, name: str,
              call: str) -> spec_mod.Disk:
    """Data disk ``name`` as attached now (from the spec or hot-plugged)."""
    booted = {d.name: d for d in spec.disks} if spec is not None else {}
    known = booted | disks.hot
    if name not in disks.serials or name not in known:
        raise ConfigError(f"guest.{call}({name!r}): no data disk of that name; this guest "
                          f"has: {', '.join(sorted(disks.serials)) or 'none'}")
    return known[name]


def attach(machine: Machine, disks: AttachedDisks, spec: spec_mod.MachineSpec | None,
           ctx: spec_mod.LaunchContext | None, run_dir: Path, owner: str,
           disk: spec_mod.Disk | Mapping[str, Any] | str) -> tuple[spec_mod.Disk,
                                                                   spec_mod.LaunchContext]:
    """Hot-add ``disk`` (a Disk, a marker's dict or a bus name) through QMP; returns the
    Disk and the launch context that now has its file (and socket).

    QEMU has the device once this returns; the guest may not see it yet
    (:func:`wait_block`). On a refusal what was added is taken back.
    """
    disk = disk_from(disk, "guest.hotplug(disk)", free_disk_name(spec, disks.serials))
    if disk.name in disks.serials or disk.name == ids.ROOT:
        raise ConfigError(f"guest.hotplug(): a disk named {disk.name!r} is already attached")
    if ctx is None:
        raise GuestError("guest.hotplug() needs the guest's LaunchContext (boot it "
                         "through VirtioSession)")
    ctx = launch.with_disk(ctx, disk, run_dir)
    commands = spec_mod.hotplug_commands(disk, ctx)
    if disk.bus == "vhost-user-blk":
        disks.backends[disk.name] = launch.start_backend(
            disk, ctx.disk_files[disk.name], run_dir, spec.smp if spec is not None else 1)
    log.info("%s: hot-plugging disk %s (%s)", owner, disk.name, disk.bus)
    _send(machine, disks, owner, disk, commands)
    disks.serials[disk.name] = disk.serial or disk.name
    disks.hot[disk.name] = disk
    return disk, ctx


def _send(machine: Machine, disks: AttachedDisks, owner: str, disk: spec_mod.Disk,
          commands: list[tuple[str, dict[str, Any]]]) -> None:
    """Send the QMP commands; on failure undo what was added so the guest stays clean."""

    def undo(done: list[str]) -> None:
        with contextlib.suppress(VirtioError, OSError):
            if "blockdev-add" in done:
                machine.qmp("blockdev-del", **{"node-name": disk.drive_id})
            if "chardev-add" in done:
                machine.qmp("chardev-remove", id=ids.vhost_chardev_id(disk.name))
        if disk.name in disks.backends:
            stop_backends({disk.name: disks.backends.pop(disk.name)}, owner)

    send_or_undo(machine, commands, undo)


def send_or_undo(machine: Machine, commands: list[tuple[str, dict[str, Any]]],
                 undo: Callable[[list[str]], None]) -> None:
    """Send QMP ``commands`` in order; if one fails (or we are interrupted), ``undo``
    gets the names of those QEMU took, then the error goes on.  Disk and NIC
    hot-plug share it: a refused ``device_add`` must not leave a backend behind."""
    done: list[str] = []
    try:
        for cmd, args in commands:
            machine.qmp(cmd, **args)
            done.append(cmd)
    except BaseException:
        undo(done)
        raise


def detach(machine: Machine, shell: Shell, disks: AttachedDisks, owner: str, name: str,
           timeout: float) -> None:
    """Hot-remove disk ``name``; returns once QEMU and the guest both let it go.

    QEMU emits DEVICE_DELETED only after the guest ejected the device (ACPI for
    PCI), so waiting for it proves the guest cooperated; then the block-layer
    node or chardev is freed and the backend stopped.
    """
    if name not in disks.serials:
        raise ConfigError(f"guest.unplug(): no data disk named {name!r} "
                          f"(have: {', '.join(sorted(disks.serials)) or 'none'})")
    log.info("%s: unplugging disk %s", owner, name)
    mark = len(machine.events)
    machine.qmp("device_del", id=name)
    machine.wait_event("DEVICE_DELETED", timeout, {"device": name}, since=mark)
    wait_qom_gone(machine, shell, name, timeout)
    if name in disks.backends:
        qmp_once_released(machine, timeout, "chardev-remove", id=ids.vhost_chardev_id(name))
        stop_backends({name: disks.backends.pop(name)}, owner)
    else:
        qmp_once_released(machine, timeout, "blockdev-del", **{"node-name": ids.drive_id(name)})
    wait_block(shell, disks.serials[name], name, present=False, timeout=timeout)
    del disks.serials[name]
    disks.hot.pop(name, None)


def qmp_once_released(machine: Machine, timeout: float, cmd: str, **args: Any) -> None:
    """Run ``cmd``, retrying while QEMU still holds the backend ("in use", "busy").

    DEVICE_DELETED and the QOM path going away come before the device is
    finalized, and only finalizing detaches its drive or chardev; seen as
    "Node drv-x is in use" once in 20 runs under TCG.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            machine.qmp(cmd, **args)
            return
        except QmpError as exc:
            if not _STILL_HELD.search(exc.desc) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def wait_qom_gone(machine: Machine, shell: Shell, name: str, timeout: float) -> None:
    """Poll QOM until ``name`` left /machine/peripheral (a stale event cannot fool it)."""
    deadline = time.monotonic() + timeout
    while any(p.get("name") == name for p in
              machine.qmp("qom-list", path="/machine/peripheral")):
        if time.monotonic() > deadline:
            raise GuestError(f"device {name!r} still in QEMU {timeout:.0f}s after "
                             "DEVICE_DELETED", shell.console_tail())
        time.sleep(0.1)


def wait_block(shell: Shell, serial: str, name: str, *, present: bool, timeout: float) -> str:
    """Poll /sys/block until the disk's serial appears (its ``/dev`` path) or is gone ("")."""
    deadline = time.monotonic() + timeout
    while True:
        found = [d for d, s in drivers.block_devices(shell).items() if s == serial]
        if bool(found) == present:
            return f"/dev/{found[0]}" if found else ""
        if time.monotonic() > deadline:
            state = "appear" if present else "go away"
            raise GuestError(f"guest block device with serial {serial!r} (disk {name!r}) "
                             f"did not {state} within {timeout:.0f}s", shell.console_tail())
        time.sleep(_POLL)
