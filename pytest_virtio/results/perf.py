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

import dataclasses
import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pytest_virtio.errors import ConfigError
from pytest_virtio.keywords import check_keys
from pytest_virtio.results.metrics import MECHANISM, Spread, spread
from pytest_virtio.results.metrics import METRICS as METRIC_TABLE
from pytest_virtio.results.records import Record, RelativeCheck
from pytest_virtio.units import parse_count, parse_duration, parse_rate
from pytest_virtio.workloads.fio import FioResult

__all__ = [
    "ACCELERATORS",
    "METRICS",
    "PERF_KEYS",
    "PerfSpec",
    "Status",
    "check_absolute",
    "check_applicable",
    "check_relative",
    "judge",
    "metric_value",
    "relative_outcomes",
]

#: A measurement the checks understand: fio's own result, or a report Record
#: (the controller of an xdist run only has Records, shipped from the workers).
Measured = FioResult | Record

MARKER = "perf"
ACCELERATORS = ("kvm", "tcg")
METRICS = tuple(METRIC_TABLE)
THRESHOLD_KEYS = ("min_iops", "min_bw", "max_lat_p99", "max_lat_mean")
PERF_KEYS = (*THRESHOLD_KEYS, "faster_than", "by", "metric", "rounds")
#: A timed sample whose QEMU spent more than this share of its runnable time waiting
#: for a CPU measured the host's load, not the device: relative verdicts on such
#: samples are inconclusive (recorded as :attr:`Record.cpu_starved` by the runner).
STARVED_LIMIT = 0.5
#: Most rounds a marker may ask for (each is a full workload run on the guest).
MAX_ROUNDS = 50

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
_FORMATTERS: dict[str, Callable[[float], str]] = {m.name: m.fmt for m in METRIC_TABLE.values()}
_LABELS = {m.name: m.label for m in METRIC_TABLE.values()}
_HIGHER_IS_BETTER = {m.name: m.higher_is_better for m in METRIC_TABLE.values()}

# A threshold: ("*", value) applies to every accelerator, otherwise one pair per
# accelerator named.  Tuples, not dicts, keep PerfSpec hashable.
Threshold = tuple[tuple[str, float], ...]


def _where(key: str) -> str:
    return f"@pytest.mark.{MARKER}({key}=...)"


def _parse_threshold(key: str, value: object) -> Threshold:
    """One threshold argument (a value or a per-accelerator dict) → ``Threshold``."""
    parse = _PARSERS[_THRESHOLD_METRIC[key]]
    if isinstance(value, Mapping):
        _check_accelerators(key, value)
        return tuple((str(accel), _parse_value(key, parse, v)) for accel, v in value.items())
    return (("*", _parse_value(key, parse, value)),)


def _check_accelerators(key: str, value: Mapping[object, object]) -> None:
    """A per-accelerator dict: known accelerators, at least one."""
    check_keys(_where(key), value, ACCELERATORS)
    if not value:
        raise ConfigError(f"{_where(key)}: an empty dict promises nothing; name an "
                          f"accelerator ({', '.join(ACCELERATORS)}) or give one value")


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
    #: The required factor: one number, or per accelerator as a Threshold.
    by: float | Threshold = 1.0
    metric: str = "iops"
    #: Runs of the workload per test (None: the session's --virtio-perf-rounds).
    rounds: int | None = None

    def by_for(self, accel: str | None) -> float | None:
        """The factor required under ``accel`` (None: no relative promise there)."""
        if isinstance(self.by, float | int):
            return float(self.by)
        return _for_accel(self.by, accel or "*")

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
        check_keys(f"@pytest.mark.{MARKER}", kwargs, PERF_KEYS)
        thresholds = {
            key: _parse_threshold(key, kwargs[key])
            for key in THRESHOLD_KEYS
            if kwargs.get(key) is not None
        }
        faster_than = _parse_faster_than(kwargs.get("faster_than"))
        by = _parse_by(kwargs.get("by", 1.0))
        if "by" in kwargs and faster_than is None:
            raise ConfigError(f"{_where('by')}: 'by' needs 'faster_than' (a device to beat)")
        metric = kwargs.get("metric", "iops")
        if metric not in METRICS:
            raise ConfigError(
                f"{_where('metric')}: {metric!r} is not known; allowed: {', '.join(METRICS)}"
            )
        return cls(faster_than=faster_than, by=by, metric=str(metric),
                   rounds=_parse_rounds(kwargs.get("rounds")), **thresholds)

    @classmethod
    def from_marker(cls, args: tuple[object, ...], kwargs: Mapping[str, object]) -> PerfSpec:
        """As :meth:`from_kwargs`, refusing positional arguments (they would be ambiguous)."""
        if args:
            raise ConfigError(
                f"@pytest.mark.{MARKER}: takes keyword arguments only "
                f"(got positional {args!r}); allowed keys: {', '.join(PERF_KEYS)}"
            )
        return cls.from_kwargs(kwargs)


def _factor(value: object) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{_where('by')}: {value!r} must be a positive number")
    return float(value)


def _parse_by(value: object) -> float | Threshold:
    """``by=1.5`` or ``by={"kvm": 1.5, "tcg": 1.0}`` (an accelerator left out: no promise)."""
    if not isinstance(value, Mapping):
        return _factor(value)
    _check_accelerators("by", value)
    return tuple((str(accel), _factor(v)) for accel, v in value.items())


def parse_rounds(value: object, where: str) -> int:
    """A round count: a whole number from 1 to :data:`MAX_ROUNDS`."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ROUNDS:
        raise ConfigError(f"{where}: {value!r} must be a whole number from 1 to {MAX_ROUNDS}")
    return value


def _parse_rounds(value: object) -> int | None:
    return None if value is None else parse_rounds(value, _where("rounds"))


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
    """The number a metric names; ``None`` when it was not measured (p99 disabled,
    mechanism not counted)."""
    if isinstance(result, Record):
        return result.value(metric)
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    if metric == "iops":
        return result.iops
    if metric == "bw":
        return result.bw
    if metric == "lat_p99":
        return result.lat_p99_ns
    if metric == "lat_mean":
        return result.lat_mean_ns if result.read.total_ios + result.write.total_ios else None
    return None


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


class Status(enum.StrEnum):
    """A relative check's outcome, decided by :func:`judge` (and starvation)."""

    OK = "ok"
    FAILED = "FAILED"
    INCONCLUSIVE = "inconclusive"

    @property
    def label(self) -> str:
        """How the session's summary and the chart name it (``ok``, ``FAILED``,
        ``INCONCLUSIVE``)."""
        return self.value if self is Status.OK else self.value.upper()


@dataclass(frozen=True)
class Verdict:
    """One relative check judged on every sample of both devices.

    ``ratio`` compares the medians ("how many times better"); ``low``/``high``
    are the worst and best case the spreads allow (this device's worst sample
    against the reference's best, and the other way round).  ``ok`` when even
    the worst case clears the factor, ``FAILED`` when even the best case misses
    it, ``inconclusive`` when the factor lies inside the range: the host's
    noise is larger than the difference the test asks about.
    """

    outcome: Status
    ratio: float | None = None
    low: float | None = None
    high: float | None = None
    rounds: tuple[int, int] = (0, 0)
    reason: str = ""


OK, FAILED, INCONCLUSIVE = Status.OK, Status.FAILED, Status.INCONCLUSIVE


def _div(a: float, b: float) -> float:
    return a / b if b else math.inf


def judge(metric: str, by: float, mine: Spread | None, theirs: Spread | None) -> Verdict:
    """The verdict for ``mine`` vs ``theirs`` (None: not measured) at factor ``by``."""
    if mine is None or theirs is None:
        return Verdict(FAILED, reason="not measured")
    if _HIGHER_IS_BETTER[metric]:
        ratio = _div(mine.median, theirs.median)
        low, high = _div(mine.low, theirs.high), _div(mine.high, theirs.low)
    else:
        ratio = _div(theirs.median, mine.median)
        low, high = _div(theirs.low, mine.high), _div(theirs.high, mine.low)
    outcome = OK if low >= by else FAILED if high < by else INCONCLUSIVE
    return Verdict(outcome, ratio, low, high, (mine.n, theirs.n))


def _show(s: Spread, fmt: Callable[[float], str]) -> str:
    if s.n == 1:
        return fmt(s.median)
    return f"{fmt(s.median)} (median of {s.n}, {fmt(s.low)}..{fmt(s.high)})"


def describe(verdict: Verdict, metric: str, by: float, mine: Spread, theirs: Spread,
             reference: str) -> str:
    """``IOPS 2,000 vs ide 1,000 is 2.00x; required 1.5x`` (with spreads when repeated)."""
    fmt = _FORMATTERS[metric]
    text = (f"{_LABELS[metric]} {_show(mine, fmt)} vs {reference} {_show(theirs, fmt)} "
            f"is {verdict.ratio:.2f}x")
    if mine.n > 1 or theirs.n > 1:
        text += f" (range {verdict.low:.2f}x..{verdict.high:.2f}x)"
    text += f"; required {by:g}x"
    if verdict.outcome == INCONCLUSIVE:
        text += ": inconclusive, the spreads straddle the factor"
    return text


def check_relative(
    spec: PerfSpec,
    results_by_device: Mapping[str, Measured | Sequence[Measured]],
    device: str,
    *,
    workload: str | None = None,
    accel: str | None = None,
) -> list[str]:
    """Check ``faster_than``/``by``: is ``device`` ``by`` times better than the reference?

    "Better" follows the metric: more IOPS or bandwidth, or less latency or
    fewer traps (a device twice as fast by ``lat_p99`` has half the
    reference's p99).  A device may map to several samples (rounds); medians
    are compared and an inconclusive spread is reported as a failure line
    here (the session-end judgement, :func:`relative_outcomes`, keeps the
    three outcomes apart).  A missing result for either device is a failure,
    not a pass, because a comparison that silently did not happen is the bug
    this check exists to find.
    """
    if spec.faster_than is None:
        return []
    reference = (spec.faster_than if isinstance(spec.faster_than, str)
                 else spec.reference_for(device))
    by = spec.by_for(accel)
    if reference is None or by is None:
        return []
    metric, label = spec.metric, _LABELS[spec.metric]
    mine, theirs = _samples(results_by_device.get(device)), _samples(
        results_by_device.get(reference))
    name = workload or (_workload_name(mine[0], None) if mine else "fio")
    head = f"{name} on {device}"
    if reference == device:
        return [f"{head}: faster_than names the device itself ({device!r})"]
    if not mine or not theirs:
        missing = ", ".join(d for d, r in ((device, mine), (reference, theirs)) if not r)
        have = ", ".join(sorted(results_by_device)) or "none"
        return [f"{head}: cannot compare {label}, no result for {missing} (have: {have})"]
    ours = spread(metric_value(m, metric) for m in mine)
    ref = spread(metric_value(m, metric) for m in theirs)
    if ours is None or ref is None:
        return [f"{head}: cannot compare {label}, fio did not report it (or it was not counted)"]
    verdict = judge(metric, by, ours, ref)
    if verdict.outcome == OK:
        return []
    return [f"{head}: {describe(verdict, metric, by, ours, ref, reference)}"]


def _samples(value: Measured | Sequence[Measured] | None) -> list[Measured]:
    if value is None:
        return []
    if isinstance(value, Record | FioResult):
        return [value]
    return list(value)


def _peers(records: Iterable[Record], check: RelativeCheck) -> dict[str, list[Record]]:
    """The check's matrix siblings by device: same test function, workload, accelerator
    and machine (shards of other hosts are judged apart).  When the check's own item
    measured its reference alongside (paired, interleaved rounds), only those pairs."""
    pool = list(records)
    paired = [r for r in pool if r.pair == check.test_id]
    if not any(r.device == check.faster_than for r in paired):
        paired = []  # this reference was not measured alongside: every sample of it
    peers: dict[str, list[Record]] = {}
    for r in paired or pool:
        if (r.group, r.workload, r.accel, r.machine) == (
                check.group, check.workload, check.accel, check.machine or r.machine):
            peers.setdefault(r.device, []).append(r)
    return peers


@dataclass(frozen=True)
class Outcome:
    """A session-end relative check with its verdict and readable failure lines."""

    check: RelativeCheck
    verdict: Verdict
    failures: tuple[str, ...]

    @property
    def ratio(self) -> float | None:
        return self.verdict.ratio


def relative_outcomes(records: Iterable[Record], checks: Iterable[RelativeCheck]
                      ) -> list[Outcome]:
    """Every ``faster_than`` check of the session, judged on all samples of both devices."""
    pool = list(records)
    outcomes: list[Outcome] = []
    for check in _unique(checks):
        by_device = _peers(pool, check)
        mine = spread(r.value(check.metric) for r in by_device.get(check.device, ()))
        theirs = spread(r.value(check.metric) for r in by_device.get(check.faster_than, ()))
        verdict = judge(check.metric, check.by, mine, theirs)
        spec = PerfSpec(faster_than=check.faster_than, by=check.by, metric=check.metric)
        failures = () if verdict.outcome == OK else tuple(
            check_relative(spec, by_device, check.device, workload=check.workload))
        starved = _starved(by_device, check)
        if starved is not None and verdict.outcome != INCONCLUSIVE:
            verdict = dataclasses.replace(verdict, outcome=INCONCLUSIVE, reason="starved")
            failures = (
                f"{check.workload} on {check.device}: inconclusive, {verdict.ratio:.2f}x "
                f"measured while QEMU waited for a CPU {starved:.0%} of the time it was "
                f"runnable (limit {STARVED_LIMIT:.0%}): the host is too busy for a timed "
                "comparison",)
        outcomes.append(Outcome(check, verdict, failures))
    return outcomes


def _starved(by_device: Mapping[str, list[Record]], check: RelativeCheck) -> float | None:
    """The worst starvation among the compared samples of a timed metric, if over the limit."""
    if check.metric in MECHANISM:
        return None
    shares = [r.cpu_starved for d in (check.device, check.faster_than)
              for r in by_device.get(d, ()) if r.cpu_starved is not None]
    worst = max(shares, default=0.0)
    return worst if worst > STARVED_LIMIT else None


def _unique(checks: Iterable[RelativeCheck]) -> list[RelativeCheck]:
    """One check per (test, machine, promise): merged shards repeat declarations."""
    seen: dict[tuple[str, str, str, str, float], RelativeCheck] = {}
    for check in checks:
        key = (check.test_id, check.machine, check.metric, check.faster_than, check.by)
        seen.setdefault(key, check)
    return list(seen.values())


#: What each workload kind measures; a threshold on anything else can never be checked.
_KIND_METRICS = {
    "fio": frozenset(METRICS),
    "dd": frozenset({"iops", "bw", *MECHANISM}),
    "iperf3": frozenset({"bw", "traps_per_io", "irqs_per_io"}),
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
