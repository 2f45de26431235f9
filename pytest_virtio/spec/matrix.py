"""virtio_matrix: axes, their values and one spec per combination."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

from pytest_virtio.errors import ConfigError
from pytest_virtio.spec._util import _as_tuple, _check_choice, _choices
from pytest_virtio.spec.catalogue import (
    _NUM_QUEUES_PROP,
    _QUEUE_SIZE_PROP,
    DISK_BUSES,
    LOGICAL_BLOCK_SIZES_BY_BUS,
    MATRIX_AXES,
    NIC_MODELS,
    PHYSICAL_BLOCK_SIZE_BUSES,
    RING_FEATURE_BUSES,
    ROOT_BUSES,
    VIRTIO_DISK_BUSES,
)
from pytest_virtio.spec.model import Disk, MachineSpec, Nic

_AXIS_VALUES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {"disk": DISK_BUSES, "nic": NIC_MODELS, "root_bus": ROOT_BUSES}
)


def _axis_values(axis: str, values: Any) -> tuple[str, ...]:
    _check_choice(axis, MATRIX_AXES, "@pytest.mark.virtio_matrix: axis")
    items = _as_tuple(values, axis)
    if not items:
        raise ConfigError(f"@pytest.mark.virtio_matrix: axis {axis!r} needs at least one value")
    for value in items:
        _check_choice(value, _AXIS_VALUES[axis], f"@pytest.mark.virtio_matrix: {axis}")
    if len(set(items)) != len(items):
        raise ConfigError(f"@pytest.mark.virtio_matrix: axis {axis!r} repeats a value: {items!r}")
    return items


def matrix_params(kwargs: Mapping[str, Sequence[str]]) -> list[tuple[str, dict[str, str]]]:
    """The cartesian product of the axes as (id, choice), ids like ``disk=ahci-nic=e1000``.

    Axes keep the order the user wrote them in, so ids read like the marker.
    """
    if not kwargs:
        raise ConfigError(
            f"@pytest.mark.virtio_matrix needs at least one axis: {_choices(MATRIX_AXES)}"
        )
    axes = {axis: _axis_values(axis, values) for axis, values in kwargs.items()}
    params: list[tuple[str, dict[str, str]]] = []
    for combo in itertools.product(*axes.values()):
        choice = dict(zip(axes, combo, strict=True))
        params.append(("-".join(f"{k}={v}" for k, v in choice.items()), choice))
    return params


def _rebus(disk: Disk, bus: str) -> Disk:
    """``disk`` moved to ``bus``, dropping options the new bus cannot express.

    Why drop instead of fail: a matrix over buses is the point of the marker; a
    num_queues written for virtio-blk must not make the IDE leg uncollectable.
    Options that change the data (image/format) are kept and still validated.
    """
    changes: dict[str, Any] = {"bus": bus}
    if bus not in VIRTIO_DISK_BUSES:
        changes["transport"] = "default"
    if bus not in _NUM_QUEUES_PROP:
        changes["num_queues"] = None
    if bus not in _QUEUE_SIZE_PROP:
        changes["queue_size"] = None
    if bus not in RING_FEATURE_BUSES:
        changes.update(event_idx=True, indirect_desc=True)
    if disk.logical_block_size not in LOGICAL_BLOCK_SIZES_BY_BUS[bus]:
        changes["logical_block_size"] = None
    if bus not in PHYSICAL_BLOCK_SIZE_BUSES:
        changes["physical_block_size"] = None
    if bus != "vhost-user-blk":
        changes["reconnect"] = None
    else:
        changes.update(cache="none", discard=False, serial=None)
    return dataclasses.replace(disk, **changes)


def _remodel(nic: Nic, model: str) -> Nic:
    """``nic`` as ``model``; virtio-only options are dropped for emulated models."""
    if model == "virtio-net":
        return dataclasses.replace(nic, model=model)
    return dataclasses.replace(nic, model=model, transport="default", queues=None)


def apply_matrix(spec: MachineSpec, choice: Mapping[str, str]) -> MachineSpec:
    """Apply one matrix choice: disk -> first data disk's bus (or add disk0), nic ->
    first NIC's model (or add net0), root_bus -> root_bus."""
    for axis in choice:
        _check_choice(axis, MATRIX_AXES, "@pytest.mark.virtio_matrix: axis")
    changes: dict[str, Any] = {}
    if "disk" in choice:
        bus = choice["disk"]
        first = _rebus(spec.disks[0], bus) if spec.disks else Disk(name="disk0", bus=bus)
        changes["disks"] = (first, *spec.disks[1:])
    if "nic" in choice:
        model = choice["nic"]
        changes["nics"] = (
            _remodel(spec.nics[0], model) if spec.nics else Nic(model=model),
            *spec.nics[1:],
        )
    if "root_bus" in choice:
        changes["root_bus"] = choice["root_bus"]
    return spec.replace(**changes)
