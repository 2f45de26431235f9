"""Small validation and QEMU option-string helpers shared by the spec modules."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

from pytest_virtio.errors import ConfigError
from pytest_virtio.spec.catalogue import _NAME_RE, _RESERVED_NAMES, TRANSPORTS


def _choices(values: Iterable[str]) -> str:
    return ", ".join(repr(v) for v in values)


def _check_choice(value: object, choices: Sequence[str], what: str) -> None:
    """Raise a ConfigError naming the bad value and every valid one."""
    if value not in choices:
        raise ConfigError(f"{what} {value!r} is not valid; choose one of: {_choices(choices)}")


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"{what} name {name!r} is not valid: use a letter then up to 31 letters, "
            "digits, '_' or '-' (it becomes a QEMU id)"
        )
    if name in _RESERVED_NAMES:
        raise ConfigError(f"{what} name {name!r} is reserved (the root disk, the modules disk "
                          "or the command channel use it); pick another")


def _check_virtio_identity(name: object, transport: object, what: str) -> None:
    """A virtio device's name and transport, validated the same way for every kind."""
    _check_name(name, what)
    _check_choice(transport, TRANSPORTS, f"{what} {name!r}: transport")


def _check_count(value: object, what: str, low: int, high: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{what} must be an integer in {low}..{high}, got {value!r}")


def _esc(value: str) -> str:
    """QEMU option values escape ',' by doubling it (paths may contain commas)."""
    return value.replace(",", ",,")


Props: TypeAlias = list[tuple[str, str]]
#: A device property as QMP types it (``device_add`` wants ints and bools where
#: ``-device`` takes strings); built once, rendered to argv by ``_argv_props``.
PropValue: TypeAlias = str | int | bool
TypedProps: TypeAlias = list[tuple[str, PropValue]]


def _opts(head: str, props: Props) -> str:
    """``head,k=v,k=v`` with values escaped; an empty head gives ``k=v,...``."""
    parts = [head] if head else []
    parts += [f"{key}={_esc(val)}" for key, val in props]
    return ",".join(parts)


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def _argv_props(props: TypedProps) -> Props:
    """Typed properties as ``-device`` strings: bools are on/off, ints decimal."""
    return [(key, _onoff(val) if isinstance(val, bool) else str(val)) for key, val in props]


def _typed_transport_props(transport: str) -> TypedProps:
    """Forcing modern-only or legacy-only virtio-pci (default: QEMU's transitional).

    ``disable-legacy`` is an OnOffAuto property (a string in QMP), ``disable-modern``
    a bool.
    """
    if transport == "modern":
        return [("disable-legacy", "on"), ("disable-modern", False)]
    if transport == "legacy":
        return [("disable-modern", True), ("disable-legacy", "off")]
    return []


def _transport_props(transport: str) -> Props:
    return _argv_props(_typed_transport_props(transport))


def _as_tuple(value: Any, what: str) -> tuple[Any, ...]:
    """Markers pass lists; frozen specs need tuples. A lone item becomes a 1-tuple."""
    if value is None:
        return ()
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        return (value,)
    return tuple(value)


def _str_tuple(value: Any, what: str) -> tuple[str, ...]:
    items = _as_tuple(value, what)
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{what} must be strings, got {item!r}")
    return items
