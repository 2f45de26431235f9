"""Units: the 1024/1000 conventions, ns durations, errors that name the value."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_virtio.errors import ConfigError
from pytest_virtio.units import (
    format_count,
    format_duration,
    format_rate,
    format_size,
    parse_count,
    parse_duration,
    parse_rate,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        ("512", 512),
        ("4k", 4096),
        ("4K", 4096),
        ("4KB", 4096),
        ("4KiB", 4096),
        ("4kib", 4096),
        ("200M", 200 * 1024**2),
        ("1G", 1024**3),
        ("1.5k", 1536),
        (" 2 MiB ", 2 * 1024**2),
        ("1T", 1024**4),
        ("10b", 10),
        ("1.5G", 3 << 29),
        ("1P", 1 << 50),
        (0, 0),
        (7.0, 7),
    ],
)
def test_parse_size(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "k", "4q", "-4k", "4 k b", "1e3", -1, True, "4k/s", None])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)
    assert "1024-based" in str(info.value)


@given(st.integers(min_value=1, max_value=1 << 40), st.sampled_from(["", "K", "M", "G", "T"]))
def test_parse_size_whole_numbers_exact(number: int, unit: str) -> None:
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    assert parse_size(f"{number}{unit}") == number * scale


def test_parse_size_names_the_value_and_can_refuse_zero() -> None:
    with pytest.raises(ConfigError, match=r"^memory must be like .*, got 'lots'$"):
        parse_size("lots", "memory")
    with pytest.raises(ConfigError, match=r"^guest.balloon\(target\) must be positive, got '0M'$"):
        parse_size("0M", "guest.balloon(target)", positive=True)
    assert parse_size("1k", positive=True) == 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("200M", 200 * 1024**2),
        ("200M/s", 200 * 1024**2),
        ("200MiB/s", 200 * 1024**2),
        ("200 MB/s", 200 * 1024**2),
        ("1.5G/s", 1.5 * 1024**3),
        ("100Mps", 100 * 1024**2),
        (1000, 1000.0),
        (12.5, 12.5),
    ],
)
def test_parse_rate(text: float | str, expected: float) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("bad", ["fast", "M/s", "-1M/s", float("nan"), float("inf"), [1]])
def test_parse_rate_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match="invalid rate"):
        parse_rate(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [(10000, 10000), ("10k", 10000), ("10K", 10000), ("1.5M", 1_500_000), ("10,000", 10000)],
)
def test_parse_count_is_decimal(text: int | str, expected: float) -> None:
    assert parse_count(text) == expected


@pytest.mark.parametrize("bad", ["many", "10kb", "-5", None])
def test_parse_count_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match="invalid count"):
        parse_count(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2ms", 2_000_000),
        ("150us", 150_000),
        ("150µs", 150_000),
        ("1s", 1_000_000_000),
        ("1.5s", 1_500_000_000),
        ("500ns", 500),
        ("500", 500),
        (750, 750),
        ("2min", 120_000_000_000),
    ],
)
def test_parse_duration(text: int | str, expected: int) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["2 hours", "ms", "fast", "-1s", "1e3ms"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (4096, "4 KiB"),
        (1536, "1.50 KiB"),
        (200 * 1024**2, "200 MiB"),
        (int(15.25 * 1024**3), "15.2 GiB"),
    ],
)
def test_format_size(value: int, expected: str) -> None:
    assert format_size(value) == expected


def test_format_rate_count_duration() -> None:
    assert format_rate(320384127) == "306 MiB/s"
    assert format_count(4812.4) == "4,812"
    assert format_count(1_234_567) == "1,234,567"
    assert format_duration(358400) == "358 µs"
    assert format_duration(2_244_608) == "2.24 ms"
    assert format_duration(1_500_000_000) == "1.50 s"
    assert format_duration(800) == "800 ns"


@given(st.integers(min_value=0, max_value=2**50))
def test_size_roundtrip_within_display_precision(n: int) -> None:
    text = format_size(n).replace(" ", "")
    assert parse_size(text) == pytest.approx(n, rel=0.01, abs=1)


@given(st.integers(min_value=1, max_value=10**12))
def test_duration_roundtrip_within_display_precision(ns: int) -> None:
    text = format_duration(ns).replace(" ", "")
    assert parse_duration(text) == pytest.approx(ns, rel=0.01, abs=1)
