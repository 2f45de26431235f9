"""Parse and format the quantities people write in markers, options and reports.

Conventions (decided once, here, so every module agrees):

* **Sizes and byte rates are 1024-based**, whatever the suffix spelling: ``"4k"``,
  ``"4K"``, ``"4KB"`` and ``"4KiB"`` are all 4096 bytes, ``"1M/s"`` and ``"1MiB/s"``
  are 1,048,576 bytes per second.  This is fio's default (``kb_base=1024``), and the
  numbers we compare come from fio, so a threshold written in fio's own notation
  means exactly what fio meant.  Formatting always prints the unambiguous IEC form
  (``KiB``, ``MiB/s``).
* **Counts (IOPS) are 1000-based**: ``"10k"`` IOPS is 10,000 operations per second,
  because nobody means 10,240 operations.
* **Durations are stored as integer nanoseconds** (fio 3's native latency unit).
  A bare number given to :func:`parse_duration` is therefore nanoseconds; write a
  suffix (``"2ms"``, ``"150us"``, ``"1s"``) to say anything else.

Every parser raises :class:`~pytest_virtio.errors.ConfigError` naming the bad
value and showing valid examples, because these strings come from users.
"""

from __future__ import annotations

import math
import re

from pytest_virtio.errors import ConfigError

__all__ = [
    "format_count",
    "format_duration",
    "format_rate",
    "format_size",
    "parse_count",
    "parse_duration",
    "parse_rate",
    "parse_size",
]

_BINARY: dict[str, int] = {
    "": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
}
_DECIMAL: dict[str, int] = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_RATE_SUFFIX_RE = re.compile(r"\s*(?:/\s*s|ps)\s*$", re.IGNORECASE)
_COUNT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|sec|m|min|h)?\s*$")

_NS_PER = {
    None: 1,
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "sec": 1_000_000_000,
    "m": 60_000_000_000,
    "min": 60_000_000_000,
    "h": 3_600_000_000_000,
}


def _check_number(value: int | float, what: str, example: str) -> float:
    """Reject bools, NaN, infinities and negatives: none is a meaningful quantity."""
    if isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"invalid {what} {value!r}: expected a non-negative number or {example}")
    return float(value)


def parse_size(value: int | str, what: str = "size", *, positive: bool = False) -> int:
    """Bytes in ``value`` (``4096``, ``"4k"``, ``"200M"``, ``"1.5G"``, ``"1GiB"``), 1024-based.

    The one size grammar for every caller: fio and dd block sizes, guest memory,
    blank disk sizes, balloon targets.  Fractions are allowed with any suffix, as
    QEMU's own ``-m 1.5G`` allows them; the result is rounded to whole bytes
    because nothing transfers half a byte, and a caller that needs a coarser unit
    (memory: whole MiB) checks that itself.  ``what`` names the value in the error
    (``"memory"``, ``"disk 'data': size"``); ``positive`` refuses zero.
    """
    problem = f"{what} must be like '64M', '1.5G', '4k' or a byte count (1024-based), got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(problem)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match is None:
            raise ConfigError(problem)
        number, prefix = match.groups()
        size = round(float(number) * _BINARY[prefix.lower()])
    elif not math.isfinite(value) or value < 0:
        raise ConfigError(problem)
    else:
        size = round(value)
    if positive and size <= 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return size


def parse_rate(value: int | float | str) -> float:
    """Bytes per second in ``value`` (``"200M"``, ``"200MiB/s"``, ``"1.5G/s"``), 1024-based.

    The ``/s`` is optional so that a bandwidth threshold reads like fio's ``bs``.
    """
    example = "a rate like '200M/s', '200MiB/s', '1G' (1024-based)"
    if isinstance(value, int | float):
        return _check_number(value, "rate", example)
    if not isinstance(value, str):
        raise ConfigError(f"invalid rate {value!r}: expected {example}")
    text = _RATE_SUFFIX_RE.sub("", value)
    match = _SIZE_RE.match(text)
    if match is None:
        raise ConfigError(f"invalid rate {value!r}: expected {example}")
    number, prefix = match.groups()
    return float(number) * _BINARY[prefix.lower()]


def parse_count(value: int | float | str) -> float:
    """A count such as IOPS (``10000``, ``"10k"``, ``"1.2M"``), 1000-based."""
    example = "a count like 10000, '10k', '1.5M'"
    if isinstance(value, int | float):
        return _check_number(value, "count", example)
    if not isinstance(value, str):
        raise ConfigError(f"invalid count {value!r}: expected {example}")
    match = _COUNT_RE.match(value.replace(",", "").replace("_", ""))
    if match is None:
        raise ConfigError(f"invalid count {value!r}: expected {example}")
    number, prefix = match.groups()
    return float(number) * _DECIMAL[prefix.lower()]


def parse_duration(value: int | float | str) -> int:
    """Nanoseconds in ``value`` (``"2ms"``, ``"150us"``, ``"1s"``); a bare number is ns."""
    example = "a duration like '2ms', '150us', '1s' (bare numbers are nanoseconds)"
    if isinstance(value, int | float):
        return round(_check_number(value, "duration", example))
    if not isinstance(value, str):
        raise ConfigError(f"invalid duration {value!r}: expected {example}")
    match = _DURATION_RE.match(value)
    if match is None:
        raise ConfigError(f"invalid duration {value!r}: expected {example}")
    number, unit = match.groups()
    return round(float(number) * _NS_PER[unit])


def _scaled(value: float, base: int, units: tuple[str, ...]) -> tuple[float, str]:
    """Divide ``value`` down by ``base`` until it is below ``base`` or units run out."""
    index = 0
    while abs(value) >= base and index < len(units) - 1:
        value /= base
        index += 1
    return value, units[index]


def _three_digits(value: float) -> str:
    """About three significant digits: enough to compare, few enough to read."""
    if value >= 100 or value == int(value):
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_size(num_bytes: float) -> str:
    """``4096`` → ``"4 KiB"``; IEC units so the 1024 base is never in doubt."""
    value, unit = _scaled(float(num_bytes), 1024, ("B", "KiB", "MiB", "GiB", "TiB", "PiB"))
    return f"{_three_digits(value)} {unit}"


def format_rate(bytes_per_second: float) -> str:
    """``1048576`` → ``"1 MiB/s"``."""
    return f"{format_size(bytes_per_second)}/s"


def format_count(count: float) -> str:
    """``4812.4`` → ``"4,812"``: whole, comma-grouped, as people quote IOPS."""
    return f"{round(count):,}"


def format_duration(ns: float) -> str:
    """``358400`` → ``"358 µs"``: the largest unit that keeps the number at least 1."""
    value = float(ns)
    for unit, size in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if abs(value) >= size:
            return f"{_three_digits(value / size)} {unit}"
    return f"{_three_digits(value)} ns"
