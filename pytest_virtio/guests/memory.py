"""A guest's memory from the host: the virtio-balloon's target and its statistics.

The QMP side (``balloon``, ``query-balloon``, the stats polling) is
:mod:`pytest_virtio.channels.balloon`; this room checks the guest has a balloon
and turns a size the test wrote into bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pytest_virtio.channels import balloon as balloon_mod
from pytest_virtio.channels.balloon import BalloonStats
from pytest_virtio.errors import ConfigError
from pytest_virtio.qemu.machine import Machine
from pytest_virtio.spec import Balloon, MachineSpec
from pytest_virtio.units import format_size, parse_size

__all__ = ["balloon", "balloon_device", "stats"]

log = logging.getLogger(__name__)


def balloon_device(spec: MachineSpec | None) -> str:
    """The name of ``spec``'s balloon; ConfigError (with the fix) when it has none."""
    devices = spec.devices if spec is not None else ()
    dev = next((d for d in devices if isinstance(d, Balloon)), None)
    if dev is None:
        raise ConfigError("this guest has no balloon: add devices=['balloon'] to the vm")
    return dev.name


def balloon(machine: Machine, spec: MachineSpec | None, target: str | int, timeout: float,
            tail: Callable[[], str]) -> int:
    """Resize the guest to ``target`` (``"256M"`` or bytes); the size reached, in bytes."""
    balloon_device(spec)
    size = parse_size(target, "guest.balloon(target)", positive=True)
    log.info("%s: balloon target %s", machine.name, format_size(size))
    return balloon_mod.resize(machine.qmp, size, timeout, tail)


def stats(machine: Machine, spec: MachineSpec | None, timeout: float) -> BalloonStats:
    """A statistics report from the guest's balloon driver newer than this call."""
    return balloon_mod.stats(machine.qmp, balloon_device(spec), timeout)
