"""The one table of what a result measures, and the one way repeats are aggregated.

Every consumer — the ``perf`` checks, the terminal table, baselines, the chart —
reads a metric through :data:`METRICS` (its label, unit formatter, direction
and where a :class:`~pytest_virtio.results.records.Record` keeps it) and aggregates
repeated samples with :func:`spread` (min / median / max).  The median, not the
mean, is the central figure: on a loaded host one stalled round must not move
the verdict.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from pytest_virtio.units import format_count, format_duration, format_rate

__all__ = ["MECHANISM", "METRICS", "Metric", "Spread", "spread"]


def _ratio(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _micros(value: float) -> str:
    return f"{value:.1f} µs"


@dataclass(frozen=True)
class Metric:
    """One figure: ``field`` names the Record attribute (or ``extra`` key) holding it."""

    name: str
    label: str
    higher_is_better: bool
    fmt: Callable[[float], str]
    field: str
    in_extra: bool = False


METRICS: Mapping[str, Metric] = {
    m.name: m
    for m in (
        Metric("iops", "IOPS", True, format_count, "iops"),
        Metric("bw", "bandwidth", True, format_rate, "bw"),
        Metric("lat_p99", "p99 latency", False, format_duration, "lat_p99_ns"),
        Metric("lat_mean", "mean latency", False, format_duration, "lat_mean_ns", True),
        Metric("traps_per_io", "traps per I/O", False, _ratio, "traps_per_io"),
        Metric("irqs_per_io", "interrupts per I/O", False, _ratio, "irqs_per_io"),
        Metric("cpu_per_io", "backend CPU per I/O", False, _micros, "cpu_us_per_io"),
    )
}
#: The accelerator- and load-independent figures (counted, not timed).
MECHANISM = ("traps_per_io", "irqs_per_io", "cpu_per_io")


@dataclass(frozen=True)
class Spread:
    """Repeated samples of one figure."""

    n: int
    low: float
    median: float
    high: float

    def overlaps(self, other: Spread) -> bool:
        return self.low <= other.high and other.low <= self.high


def spread(values: Iterable[float | None]) -> Spread | None:
    """min / median / max of the values that were measured (None: nothing measured)."""
    got = sorted(float(v) for v in values if v is not None)
    if not got:
        return None
    return Spread(len(got), got[0], float(statistics.median(got)), got[-1])
