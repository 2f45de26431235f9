"""Evaluate ``@pytest.mark.perf(...)`` thresholds against fio results, purely.

The plugin validates the marker once at collection (:meth:`PerfSpec.from_marker`,
so a typo is a collection error, not a silently skipped check) and, after the
workload ran, asks :func:`check_absolute` and :func:`check_relative` for failure
lines.  An empty list means the test met its thresholds; otherwise every line
is one readable reason, e.g.::

    randread on virtio-blk: IOPS 4,812 < required 10,000 (tcg)

Thresholds may depend on the accelerator, because the same guest runs roughly
ten times slower under TCG than under KVM: ``min_iops={"kvm": 40_000,
"tcg": 10_000}``.  A dict that leaves an accelerator out means "no bound there".

Units follow :mod:`pytest_virtio.units`: IOPS are 1000-based counts (``"10k"``),
bandwidth is 1024-based bytes/s (``"200MiB/s"``), latencies are durations and a
bare latency number is nanoseconds (write ``"2ms"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from pytest_virtio.errors import ConfigError
from pytest_virtio.report import Record, RelativeCheck
from pytest_virtio.units import (
    format_count,
    format_duration,
    format_rate,
    parse_count,
    parse_duration,
    parse_rate,
)
from pytest_virtio.workloads.fio import FioResult

__all__ = [
    "ACCELERATORS",
    "METRICS",
    "PERF_KEYS",
    "PerfSpec",
    "check_absolute",
    "check_applicable",
    "check_relative",
    "metric_value",
    "relative_outcomes",
]

#: A measurement the checks understand: fio's own result, or a report Record
#: (the controller of an xdist run only has Records, shipped from the workers).
Measured = FioResult | Record

MARKER = "perf"
ACCELERATORS = ("kvm", "tcg")
METRICS = ("iops", "bw", "lat_p99", "lat_mean")
THRESHOLD_KEYS = ("min_iops", "min_bw", "max_lat_p99", "max_lat_mean")
PERF_KEYS = (*THRESHOLD_KEYS, "faster_than", "by", "metric")

# Per threshold key: the metric it bounds and the parser for its values.
_THRESHOLD_METRIC = {
    "min_iops": "iops",
    "min_bw": "bw",
    "max_lat_p99": "lat_p99",
    "max_lat_mean": "lat_mean",
}
_PARSERS: dict[str, Callable[[int | float | str], float]] = {
    "iops": parse_count,
    "bw": parse_rate,
    "lat_p99": lambda v: float(parse_duration(v)),
    "lat_mean": lambda v: float(parse_duration(v)),
}
_FORMATTERS: dict[str, Callable[[float], str]] = {
    "iops": format_count,
    "bw": format_rate,
    "lat_p99": format_duration,
    "lat_mean": format_duration,
}
_LABELS = {"iops": "IOPS", "bw": "bandwidth", "lat_p99": "p99 latency", "lat_mean": "mean latency"}
_HIGHER_IS_BETTER = {"iops": True, "bw": True, "lat_p99": False, "lat_mean": False}

# A threshold: ("*", value) applies to every accelerator, otherwise one pair per
# accelerator named.  Tuples, not dicts, keep PerfSpec hashable.
Threshold = tuple[tuple[str, float], ...]


def _where(key: str) -> str:
    return f"@pytest.mark.{MARKER}({key}=...)"


def _parse_threshold(key: str, value: object) -> Threshold:
    """One threshold argument (a value or a per-accelerator dict) → ``Threshold``."""
    parse = _PARSERS[_THRESHOLD_METRIC[key]]
    if isinstance(value, Mapping):
        unknown = [a for a in value if a not in ACCELERATORS]
        if unknown or not value:
            raise ConfigError(
                f"{_where(key)}: accelerator keys {sorted(map(str, unknown))} are not known; "
                f"allowed: {', '.join(ACCELERATORS)}"
            )
        return tuple((str(accel), _parse_value(key, parse, v)) for accel, v in value.items())
    return (("*", _parse_value(key, parse, value)),)


def _parse_value(key: str, parse: Callable[[int | float | str], float], value: object) -> float:
    if not isinstance(value, int | float | str):
        raise ConfigError(f"{_where(key)}: {value!r} is not a number or a string with a unit")
    try:
        return parse(value)
    except ConfigError as exc:
        raise ConfigError(f"{_where(key)}: {exc}") from None


def _for_accel(threshold: Threshold | None, accel: str) -> float | None:
    if threshold is None:
        return None
    values = dict(threshold)
    return values.get(accel, values.get("*"))


@dataclass(frozen=True)
class PerfSpec:
    """The validated arguments of one ``perf`` marker."""

    min_iops: Threshold | None = None
    min_bw: Threshold | None = None
    max_lat_p99: Threshold | None = None
    max_lat_mean: Threshold | None = None
    faster_than: str | tuple[tuple[str, str], ...] | None = None
    by: float = 1.0
    metric: str = "iops"

    def reference_for(self, device: str) -> str | None:
        """The device ``device`` must beat, or None when it has no relative promise.

        ``faster_than="ide"``: every other device of the matrix must beat IDE (IDE
        itself is the yardstick).  ``faster_than={"virtio-blk": "ide",
        "virtio-scsi": "ahci"}``: each paravirtual bus against its own counterpart.
        """
        if self.faster_than is None:
            return None
        if isinstance(self.faster_than, str):
            return None if device == self.faster_than else self.faster_than
        return dict(self.faster_than).get(device)

    @property
    def references(self) -> tuple[str, ...]:
        """Every device named by ``faster_than`` (both sides of the pairs)."""
        if self.faster_than is None:
            return ()
        if isinstance(self.faster_than, str):
            return (self.faster_than,)
        return tuple(d for pair in self.faster_than for d in pair)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, object]) -> PerfSpec:
        """Validate marker keyword arguments; every error names the marker and the key."""
        unknown = sorted(k for k in kwargs if k not in PERF_KEYS)
        if unknown:
            raise ConfigError(
                f"@pytest.mark.{MARKER}: unknown key {unknown[0]!r}; "
                f"allowed: {', '.join(PERF_KEYS)}"
            )
        thresholds = {
            key: _parse_threshold(key, kwargs[key])
            for key in THRESHOLD_KEYS
            if kwargs.get(key) is not None
        }
        faster_than = _parse_faster_than(kwargs.get("faster_than"))
        by = kwargs.get("by", 1.0)
        if isinstance(by, bool) or not isinstance(by, int | float) or not math.isfinite(by):
            raise ConfigError(f"{_where('by')}: {by!r} must be a positive number")
        if by <= 0:
            raise ConfigError(f"{_where('by')}: {by!r} must be a positive number")
        if "by" in kwargs and faster_than is None:
            raise ConfigError(f"{_where('by')}: 'by' needs 'faster_than' (a device to beat)")
        metric = kwargs.get("metric", "iops")
        if metric not in METRICS:
            raise ConfigError(
                f"{_where('metric')}: {metric!r} is not known; allowed: {', '.join(METRICS)}"
            )
        return cls(faster_than=faster_than, by=float(by), metric=str(metric), **thresholds)

    @classmethod
    def from_marker(cls, args: tuple[object, ...], kwargs: Mapping[str, object]) -> PerfSpec:
        """As :meth:`from_kwargs`, refusing positional arguments (they would be ambiguous)."""
        if args:
            raise ConfigError(
                f"@pytest.mark.{MARKER}: takes keyword arguments only "
                f"(got positional {args!r}); allowed keys: {', '.join(PERF_KEYS)}"
            )
        return cls.from_kwargs(kwargs)


def _parse_faster_than(value: object) -> str | tuple[tuple[str, str], ...] | None:
    """A device name, or a ``{device: reference}`` dict of matrix pairs."""
    if value is None:
        return None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping) and value and all(
        isinstance(k, str) and k and isinstance(v, str) and v and k != v
        for k, v in value.items()
    ):
        return tuple((str(k), str(v)) for k, v in value.items())
    raise ConfigError(
        f"{_where('faster_than')}: {value!r} must be a device name or a dict "
        "{device: reference device}, e.g. {'virtio-blk': 'ide'}"
    )


def metric_value(result: Measured, metric: str) -> float | None:
    """The number a metric names; ``None`` when fio did not report it (p99 disabled)."""
    if isinstance(result, Record):
        return _record_value(result, metric)
    if metric == "iops":
        return result.iops
    if metric == "bw":
        return result.bw
    if metric == "lat_p99":
        return result.lat_p99_ns
    if metric == "lat_mean":
        return result.lat_mean_ns if result.read.total_ios + result.write.total_ios else None
    raise ConfigError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")


def _record_value(record: Record, metric: str) -> float | None:
    if metric == "lat_mean":
        value = record.extra.get("lat_mean_ns")
        return float(value) if isinstance(value, int | float) else None
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    return {"iops": record.iops, "bw": record.bw, "lat_p99": record.lat_p99_ns}[metric]


def _workload_name(result: Measured, workload: str | None) -> str:
    """The name the failure line starts with: explicit, else the fio jobs' rw."""
    if workload:
        return workload
    if isinstance(result, Record):
        return result.workload
    modes = sorted({j.options.get("rw", "") for j in result.jobs} - {""})
    return "+".join(modes) or "fio"


def check_absolute(
    spec: PerfSpec, result: Measured, accel: str, device: str, *, workload: str | None = None
) -> list[str]:
    """One failure line per threshold ``result`` misses under ``accel``."""
    name = _workload_name(result, workload)
    failures: list[str] = []
    for key in THRESHOLD_KEYS:
        bound = _for_accel(getattr(spec, key), accel)
        if bound is None:
            continue
        metric = _THRESHOLD_METRIC[key]
        label, fmt = _LABELS[metric], _FORMATTERS[metric]
        value = metric_value(result, metric)
        if value is None:
            failures.append(
                f"{name} on {device}: {label} not reported by fio, but {key} is set ({accel})"
            )
        elif _HIGHER_IS_BETTER[metric] and value < bound:
            failures.append(
                f"{name} on {device}: {label} {fmt(value)} < required {fmt(bound)} ({accel})"
            )
        elif not _HIGHER_IS_BETTER[metric] and value > bound:
            failures.append(
                f"{name} on {device}: {label} {fmt(value)} > allowed {fmt(bound)} ({accel})"
            )
    return failures


def check_relative(
    spec: PerfSpec,
    results_by_device: Mapping[str, Measured],
    device: str,
    *,
    workload: str | None = None,
) -> list[str]:
    """Check ``faster_than``/``by``: is ``device`` ``by`` times better than the reference?

    "Better" follows the metric: more IOPS or bandwidth, or less latency (a
    device twice as fast by ``lat_p99`` has half the reference's p99).  A
    missing result for either device is a failure, not a pass, because a
    comparison that silently did not happen is the bug this check exists to find.
    """
    if spec.faster_than is None:
        return []
    reference = (spec.faster_than if isinstance(spec.faster_than, str)
                 else spec.reference_for(device))
    if reference is None:
        return []
    metric, label, fmt = spec.metric, _LABELS[spec.metric], _FORMATTERS[spec.metric]
    mine, theirs = results_by_device.get(device), results_by_device.get(reference)
    name = workload or (_workload_name(mine, None) if mine is not None else "fio")
    head = f"{name} on {device}"
    if reference == device:
        return [f"{head}: faster_than names the device itself ({device!r})"]
    if mine is None or theirs is None:
        missing = ", ".join(d for d, r in ((device, mine), (reference, theirs)) if r is None)
        have = ", ".join(sorted(results_by_device)) or "none"
        return [f"{head}: cannot compare {label}, no result for {missing} (have: {have})"]
    value, ref = metric_value(mine, metric), metric_value(theirs, metric)
    if value is None or ref is None:
        return [f"{head}: cannot compare {label}, fio did not report it"]
    if _HIGHER_IS_BETTER[metric]:
        ok, ratio = value >= spec.by * ref, (value / ref if ref else math.inf)
    else:
        ok, ratio = value * spec.by <= ref, (ref / value if value else math.inf)
    if ok:
        return []
    return [
        f"{head}: {label} {fmt(value)} vs {reference} {fmt(ref)} is {ratio:.2f}x; "
        f"required {spec.by:g}x"
    ]


def _mean_record(records: list[Record], metric: str) -> Record | None:
    """Repeated measurements of one device are averaged, as the baselines do."""
    values = [v for r in records if (v := metric_value(r, metric)) is not None]
    if not records:
        return None
    mean = sum(values) / len(values) if values else None
    base = records[0]
    numbers = {"iops": base.iops, "bw": base.bw, "lat_p99_ns": base.lat_p99_ns}
    extra = dict(base.extra)
    if metric == "lat_mean":
        extra["lat_mean_ns"] = mean
    else:
        numbers[{"iops": "iops", "bw": "bw", "lat_p99": "lat_p99_ns"}[metric]] = mean
    return Record(base.test_id, base.device, base.workload, base.accel, base.machine,
                  iops=float(numbers["iops"] or 0.0), bw=float(numbers["bw"] or 0.0),
                  lat_p99_ns=numbers["lat_p99_ns"], extra=extra)


def _peers(records: Iterable[Record], check: RelativeCheck) -> dict[str, Record]:
    """The check's matrix siblings by device: same test function, workload, accelerator."""
    peers: dict[str, list[Record]] = {}
    for r in records:
        if (r.extra.get("group"), r.workload, r.accel) == (check.group, check.workload,
                                                           check.accel):
            peers.setdefault(r.device, []).append(r)
    return {d: m for d, rs in peers.items() if (m := _mean_record(rs, check.metric))}


def ratio(check: RelativeCheck, by_device: Mapping[str, Record]) -> float | None:
    """How many times better the device is than the reference (None if not measurable)."""
    mine, theirs = by_device.get(check.device), by_device.get(check.faster_than)
    if mine is None or theirs is None:
        return None
    value, ref = metric_value(mine, check.metric), metric_value(theirs, check.metric)
    if value is None or ref is None or not value or not ref:
        return None
    return value / ref if _HIGHER_IS_BETTER[check.metric] else ref / value


def relative_outcomes(
    records: Iterable[Record], checks: Iterable[RelativeCheck]
) -> list[tuple[RelativeCheck, float | None, list[str]]]:
    """Every ``faster_than`` check of the session: (check, measured ratio, failure lines)."""
    pool = list(records)
    outcomes: list[tuple[RelativeCheck, float | None, list[str]]] = []
    for check in checks:
        by_device = _peers(pool, check)
        spec = PerfSpec(faster_than=check.faster_than, by=check.by, metric=check.metric)
        failures = check_relative(spec, by_device, check.device, workload=check.workload)
        outcomes.append((check, ratio(check, by_device), failures))
    return outcomes


#: What each workload kind measures; a threshold on anything else can never be checked.
_KIND_METRICS = {
    "fio": frozenset(METRICS),
    "dd": frozenset({"iops", "bw"}),
    "iperf3": frozenset({"bw"}),
}


def check_applicable(spec: PerfSpec, kind: str) -> None:
    """Refuse thresholds the workload cannot measure (iperf3 has no IOPS, dd no latency)."""
    have = _KIND_METRICS.get(kind, frozenset(METRICS))
    wanted = [(key, _THRESHOLD_METRIC[key]) for key in THRESHOLD_KEYS
              if getattr(spec, key) is not None]
    if spec.faster_than is not None:
        wanted.append(("metric", spec.metric))
    for key, metric in wanted:
        if metric not in have:
            raise ConfigError(
                f"{_where(key)}: a {kind} workload does not measure {_LABELS[metric]}; "
                f"it measures: {', '.join(_LABELS[m] for m in METRICS if m in have)}"
            )
