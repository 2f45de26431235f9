"""Marker keywords -> MachineSpec: the vm(...) grammar and its key tables."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Final

from pytest_virtio.errors import ConfigError
from pytest_virtio.keywords import check_keys
from pytest_virtio.spec._util import _as_tuple, _check_choice, _choices, _str_tuple
from pytest_virtio.spec.catalogue import DEVICE_KINDS, DISK_BUSES, NIC_MODELS
from pytest_virtio.spec.model import _DEVICE_CLASS, _DEVICE_TYPES, Device, Disk, MachineSpec, Nic

#: Every key ``@pytest.mark.vm`` / ``make_guest`` accepts (the MachineSpec fields).
SPEC_KEYS: Final = tuple(f.name for f in dataclasses.fields(MachineSpec))


def _fields_of(cls: type[Any]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def item_keys() -> dict[str, tuple[str, ...]]:
    """The dict keys each ``disks=``/``nics=``/``devices=`` item accepts, by item kind.

    ``disk``, ``nic``, then one entry per device kind (its dict also takes
    ``kind``). What ``pytest --markers`` and the README list, and what passes.
    """
    keys = {"disk": _fields_of(Disk), "nic": _fields_of(Nic)}
    keys.update({kind: _fields_of(cls) for kind, cls in _DEVICE_CLASS.items()})
    return keys


def _build(cls: type[Any], data: Mapping[str, Any], what: str) -> Any:
    """``cls(**data)`` with unknown keys reported as a ConfigError listing the allowed."""
    check_keys(what, data, _fields_of(cls))
    return cls(**data)


def _item(item: Any, what: str, default_name: str, cls: type[Any], attr: str,
          choices: tuple[str, ...]) -> Any:
    """One disk or NIC: an instance, a bus/model name, or a dict; ``what`` starts
    every error message, ``default_name`` names an item that gives no name."""
    if isinstance(item, cls):
        return item
    default = {"name": default_name}
    if isinstance(item, str):
        _check_choice(item, choices, f"{what} {attr}")
        return cls(**default, **{attr: item})
    if isinstance(item, Mapping):
        return _build(cls, {**default, **item}, what)
    noun = "a bus name" if attr == "bus" else "a model"
    raise ConfigError(
        f"{what} must be {noun} ({_choices(choices)}), a dict or a "
        f"{cls.__name__}, got {item!r}"
    )


def _listed(item: Any, index: int, where: str, cls: type[Any], axis: str, attr: str,
            choices: tuple[str, ...]) -> Any:
    """One ``disks=``/``nics=`` item; unnamed items are called ``disk<i>``/``net<i>``
    by their place in the list."""
    name = f"{'disk' if axis == 'disks' else 'net'}{index}"
    return _item(item, f"{where}: {axis}[{index}]", name, cls, attr, choices)


def disk_from(item: Any, what: str, default_name: str) -> Disk:
    """A Disk from what a marker's ``disks=`` item may be: a Disk, a bus name or a
    dict of Disk keys (``guest.hotplug`` takes the same). Every error starts with
    ``what``, and an error of the Disk itself is prefixed with it too."""
    with _errors_under(what):
        disk: Disk = _item(item, what, default_name, Disk, "bus", DISK_BUSES)
    return disk


def nic_from(item: Any, what: str, default_name: str) -> Nic:
    """A Nic from what a marker's ``nics=`` item may be (a Nic, a model name or a dict
    of Nic keys), for ``guest.hotplug_nic``: a name or dict that does not say
    ``hostfwd_ssh`` gets False (SSH is forwarded by the NIC the guest booted with).
    Every error starts with ``what``."""
    if isinstance(item, str):
        item = {"model": item}
    if isinstance(item, Mapping):
        item = {"hostfwd_ssh": False, **item}
    with _errors_under(what):
        nic: Nic = _item(item, what, default_name, Nic, "model", NIC_MODELS)
    return nic


@contextlib.contextmanager
def _errors_under(label: str) -> Iterator[None]:
    """Every ConfigError raised inside starts with ``label`` (a device's own message,
    such as a Disk's, gets it in front), so the error points at the call or marker."""
    try:
        yield
    except ConfigError as exc:
        if str(exc).startswith(label):
            raise
        raise ConfigError(f"{label}: {exc}") from None


def _disk_from(item: Any, index: int, where: str) -> Disk:
    disk: Disk = _listed(item, index, where, Disk, "disks", "bus", DISK_BUSES)
    return disk


def _nic_from(item: Any, index: int, where: str) -> Nic:
    nic: Nic = _listed(item, index, where, Nic, "nics", "model", NIC_MODELS)
    return nic


def _device_from(item: Any, index: int, where: str) -> Device:
    if isinstance(item, _DEVICE_TYPES):
        return item
    if isinstance(item, str):
        item = {"kind": item}
    if not isinstance(item, Mapping) or "kind" not in item:
        raise ConfigError(
            f"{where}: devices[{index}] must be a kind ({_choices(DEVICE_KINDS)}), a dict with "
            f"'kind', or a device object, got {item!r}"
        )
    data = dict(item)
    kind = data.pop("kind")
    _check_choice(kind, DEVICE_KINDS, f"{where}: devices[{index}] kind")
    if kind == "serial" and "names" in data:
        data["names"] = _str_tuple(data["names"], f"{where}: devices[{index}] names")
    dev: Device = _build(_DEVICE_CLASS[kind], data, f"{where}: devices[{index}] ({kind})")
    return dev


def spec_from_kwargs(marker_kwargs: Mapping[str, Any], *, where: str = "vm",
                     also_allowed: tuple[str, ...] = ()) -> MachineSpec:
    """A MachineSpec from a marker's plain-data keywords.

    Strings name a bus/model/kind, dicts give fields, objects pass through;
    unnamed disks and NICs are numbered by position (disk0, net0...). Every
    error names ``where`` (the marker) so the collection error points at it.
    ``also_allowed``: keys the caller took out before (``vm``'s ``scope``), listed
    among the allowed ones so a typo's message names every key that works.
    """
    label = f"@pytest.mark.{where}"
    check_keys(label, marker_kwargs, (*SPEC_KEYS, *also_allowed))
    data = dict(marker_kwargs)
    with _errors_under(label):
        if "disks" in data:
            items = _as_tuple(data["disks"], "disks")
            data["disks"] = tuple(_disk_from(x, i, label) for i, x in enumerate(items))
        if "nics" in data:
            items = _as_tuple(data["nics"], "nics")
            data["nics"] = tuple(_nic_from(x, i, label) for i, x in enumerate(items))
        if "devices" in data:
            items = _as_tuple(data["devices"], "devices")
            data["devices"] = tuple(_device_from(x, i, label) for i, x in enumerate(items))
        spec = MachineSpec(**data)
    return spec
