"""Results store and outputs: terminal table, JSON, junit properties, baselines.

One :class:`Record` per measured workload.  Records are plain data that survive
JSON, because under pytest-xdist each worker measures its own guests and ships
its records to the controller through ``workeroutput`` (execnet carries only
builtins); the controller then renders one table for the whole session.

Baselines work like pytest-benchmark's: save the session's records for this
host, later compare a new session against them and fail on regressions larger
than a per-metric tolerance (``"iops:10%,lat_p99:20%"``).  Comparisons are keyed
by (machine, accel, device, workload): numbers from another host or from TCG
instead of KVM are never compared, because they would differ for reasons that
have nothing to do with the code under test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import socket
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_virtio.errors import ConfigError
from pytest_virtio.metrics import MECHANISM, METRICS, spread
from pytest_virtio.units import format_count, format_duration, format_rate
from pytest_virtio.workloads.fio import FioResult

__all__ = [
    "COMPARE_METRICS",
    "Baseline",
    "Record",
    "Regression",
    "RelativeCheck",
    "SessionResults",
    "compare",
    "junit_properties",
    "load_baseline",
    "load_json",
    "machine_id",
    "parse_compare_fail",
    "records_from_json",
    "records_to_json",
    "render_table",
    "save_baseline",
    "write_json",
]

FORMAT_VERSION = 1
# Metric → (Record attribute, higher is better).
COMPARE_METRICS: dict[str, tuple[str, bool]] = {
    "iops": ("iops", True),
    "bw": ("bw", True),
    "lat_p99": ("lat_p99_ns", False),
}
_METRIC_LABELS = {"iops": "IOPS", "bw": "bandwidth", "lat_p99": "p99 latency"}
_FAIL_ITEM_RE = re.compile(r"^\s*([a-z0-9_]+)\s*:\s*(\d+(?:\.\d+)?)\s*%\s*$")

JsonScalar = str | int | float | bool | None

Key = tuple[str, str, str, str]


@dataclass(frozen=True)
class Record:
    """One measurement.  ``machine`` is the host's :func:`machine_id`."""

    test_id: str
    device: str
    workload: str
    accel: str
    machine: str
    iops: float
    bw: float
    lat_p99_ns: float | None = None
    extra: Mapping[str, JsonScalar] = field(default_factory=dict, hash=False)
    #: Mechanism metrics (workloads/mechanism.py): counted by QEMU or our backend.
    traps_per_io: float | None = None
    irqs_per_io: float | None = None
    cpu_us_per_io: float | None = None

    @classmethod
    def best_of(cls, records: Sequence[Record]) -> Record:
        """One record holding the best round of ``records`` for every figure (most IOPS,
        least latency): what absolute floors are judged on, because host load only ever
        slows a run down, so the best round is the closest to what the device can do."""
        base = records[-1]
        if len(records) == 1:
            return base
        med: dict[str, float | None] = {}
        for name, metric in METRICS.items():
            s = spread(r.value(name) for r in records)
            med[name] = None if s is None else s.high if metric.higher_is_better else s.low
        extra = {**base.extra, "lat_mean_ns": med["lat_mean"], "rounds": len(records)}
        return dataclasses.replace(
            base, iops=med["iops"] or 0.0, bw=med["bw"] or 0.0, lat_p99_ns=med["lat_p99"],
            traps_per_io=med["traps_per_io"], irqs_per_io=med["irqs_per_io"],
            cpu_us_per_io=med["cpu_per_io"], extra=extra)

    def value(self, metric: str) -> float | None:
        """The figure ``metric`` (a key of :data:`pytest_virtio.metrics.METRICS`)."""
        spec = METRICS.get(metric)
        if spec is None:
            raise ConfigError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
        raw = self.extra.get(spec.field) if spec.in_extra else getattr(self, spec.field)
        return float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None

    @classmethod
    def from_fio(
        cls,
        test_id: str,
        device: str,
        workload: str,
        accel: str,
        machine: str,
        result: FioResult,
        extra: Mapping[str, JsonScalar] | None = None,
    ) -> Record:
        """The record of one fio run: the three numbers the table and baselines use."""
        return cls(
            test_id,
            device,
            workload,
            accel,
            machine,
            iops=result.iops,
            bw=result.bw,
            lat_p99_ns=result.lat_p99_ns,
            extra=dict(extra or {}),
        )

    @property
    def key(self) -> Key:
        """What a baseline comparison matches on."""
        return (self.machine, self.accel, self.device, self.workload)

    def to_dict(self) -> dict[str, Any]:
        """Builtins only: safe for ``workeroutput``, JSON and execnet."""
        return {
            "test_id": self.test_id,
            "device": self.device,
            "workload": self.workload,
            "accel": self.accel,
            "machine": self.machine,
            "iops": self.iops,
            "bw": self.bw,
            "lat_p99_ns": self.lat_p99_ns,
            "extra": dict(self.extra),
            **{name: getattr(self, name) for name in _MECHANISM_FIELDS},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        """Inverse of :meth:`to_dict`; a malformed entry is a ConfigError naming the field."""
        try:
            extra = data.get("extra") or {}
            if not isinstance(extra, Mapping):
                raise TypeError("extra must be an object")
            lat = data.get("lat_p99_ns")
            return cls(
                test_id=_str_field(data, "test_id"),
                device=_str_field(data, "device"),
                workload=_str_field(data, "workload"),
                accel=_str_field(data, "accel"),
                machine=_str_field(data, "machine"),
                iops=float(data["iops"]),
                bw=float(data["bw"]),
                lat_p99_ns=None if lat is None else float(lat),
                extra=dict(extra),
                **{name: _optional_float(data, name) for name in _MECHANISM_FIELDS},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed result record {dict(data)!r}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Record:
        data = _loads(text, "result record")
        if not isinstance(data, Mapping):
            raise ConfigError(f"result record must be a JSON object, got {text[:80]!r}")
        return cls.from_dict(data)


_MECHANISM_FIELDS = ("traps_per_io", "irqs_per_io", "cpu_us_per_io")


def _optional_float(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    return None if value is None else float(value)


def _str_field(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string, got {value!r}")
    return value


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} is not valid JSON: {exc}") from None


def records_to_json(records: Iterable[Record], checks: Iterable[RelativeCheck] = ()) -> str:
    """A whole session's records (and its relative checks, so shards can be merged and
    judged later) as one JSON document (the ``--virtio-json`` format)."""
    return json.dumps(
        {"version": FORMAT_VERSION, "records": [r.to_dict() for r in records],
         "checks": [c.to_dict() for c in checks]},
        indent=2,
        sort_keys=True,
    )


def _read_json(path: str | os.PathLike[str], what: str) -> tuple[str, Any]:
    """A JSON file's text and value; ConfigError naming ``what`` and the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {os.fspath(path)!r}: {exc.strerror}") from None
    return text, _loads(text, f"{what} {os.fspath(path)!r}")


def load_session(path: str | os.PathLike[str]) -> SessionResults:
    """A ``--virtio-json`` file as SessionResults (records and checks); errors name it."""
    text, data = _read_json(path, "results file")
    results = SessionResults()
    if isinstance(data, Mapping):
        results.merge_dict(data)
    else:
        results.records.extend(records_from_json(text))
    return results


def records_from_json(text: str) -> list[Record]:
    """Inverse of :func:`records_to_json`; also accepts a bare list of records."""
    data = _loads(text, "results file")
    items = data.get("records") if isinstance(data, Mapping) else data
    if not isinstance(items, list):
        raise ConfigError("results file must hold a 'records' list")
    return [Record.from_dict(item) for item in items]


def _write_atomically(path: Path, text: str) -> None:
    """Write via a temp file and rename, so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(records: Iterable[Record], path: str | os.PathLike[str],
               checks: Iterable[RelativeCheck] = ()) -> None:
    """Write :func:`records_to_json` to ``path`` atomically."""
    _write_atomically(Path(path), records_to_json(records, checks) + "\n")


def load_json(path: str | os.PathLike[str]) -> list[Record]:
    return records_from_json(Path(path).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class RelativeCheck:
    """One test's ``faster_than`` promise, as plain data that travels from an xdist worker.

    Why not check inside the test: the reference device is another item of the
    same ``virtio_matrix``, which may run later or in another worker.  So each
    item only *declares* its check; the controller evaluates every check once
    all records are in (``pytest_sessionfinish``) and fails the session there.
    ``group`` is the test function (node id without the parameter part): only
    its own matrix items, with the same workload and accelerator, are compared.
    """

    test_id: str
    group: str
    device: str
    workload: str
    accel: str
    faster_than: str
    by: float = 1.0
    metric: str = "iops"
    #: The host it was measured on: merged shards judge each machine apart.
    machine: str = ""

    def to_dict(self) -> dict[str, str | float]:
        return {
            "test_id": self.test_id, "group": self.group, "device": self.device,
            "workload": self.workload, "accel": self.accel, "faster_than": self.faster_than,
            "by": self.by, "metric": self.metric, "machine": self.machine,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> RelativeCheck:
        try:
            texts = {k: str(data[k]) for k in (
                "test_id", "group", "device", "workload", "accel", "faster_than", "metric")}
            by = data["by"]
            if not isinstance(by, int | float) or isinstance(by, bool):
                raise ConfigError(f"malformed relative perf check {dict(data)!r}: by={by!r}")
            return cls(**texts, by=float(by), machine=str(data.get("machine") or ""))
        except KeyError as exc:
            raise ConfigError(f"malformed relative perf check {dict(data)!r}: no {exc}") from None


@dataclass
class SessionResults:
    """What one pytest process measured; a worker ships it, the controller merges it.

    Plain lists of plain data, so ``to_dict``/``merge_dict`` are all xdist needs.
    """

    records: list[Record] = field(default_factory=list)
    checks: list[RelativeCheck] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"records": [r.to_dict() for r in self.records],
                "checks": [c.to_dict() for c in self.checks]}

    def merge_dict(self, data: Mapping[str, Any]) -> None:
        self.records.extend(Record.from_dict(r) for r in data.get("records") or ())
        self.checks.extend(RelativeCheck.from_dict(c) for c in data.get("checks") or ())


# --- terminal table -------------------------------------------------------------------

_BASE_HEADERS = ("test", "device", "workload", "accel")
#: Table column → metric; mechanism columns appear only when something counted them.
_COLUMNS = (("IOPS", "iops"), ("bandwidth", "bw"), ("p99 latency", "lat_p99"),
            ("traps/IO", "traps_per_io"), ("IRQs/IO", "irqs_per_io"),
            ("CPU/IO", "cpu_per_io"))


def group_samples(records: Iterable[Record]) -> dict[tuple[str, ...], list[Record]]:
    """Records of one test, device, workload, accelerator and machine: the rounds of
    one result (the machine is part of the key only when there are several)."""
    pool = list(records)
    several = len({r.machine for r in pool}) > 1
    groups: dict[tuple[str, ...], list[Record]] = {}
    for r in pool:
        key = (r.test_id, r.device, r.workload, r.accel, *((r.machine,) if several else ()))
        groups.setdefault(key, []).append(r)
    return groups


def _cell(samples: Sequence[Record], metric: str) -> str:
    if metric == "iops" and samples[0].extra.get("kind") == "net":
        return "-"
    s = spread(r.value(metric) for r in samples)
    if s is None:
        return "-"
    fmt = METRICS[metric].fmt
    return fmt(s.median) if s.n == 1 else f"{fmt(s.median)} [{fmt(s.low)}..{fmt(s.high)}]"


def render_table(records: Sequence[Record]) -> str:
    """An aligned plain-text table for the terminal summary (numbers right-aligned).

    One row per test result; with rounds the cell is the median and
    ``[min..max]`` of every round.
    """
    if not records:
        return "no I/O results recorded"
    columns = [(h, m) for h, m in _COLUMNS
               if m not in MECHANISM or any(r.value(m) is not None for r in records)]
    base = (*_BASE_HEADERS, *(("machine",) if len({r.machine for r in records}) > 1 else ()))
    headers = (*base, *(h for h, _ in columns))
    rows = [headers]
    for key, samples in group_samples(records).items():
        rows.append((*key, *(_cell(samples, m) for _, m in columns)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]

    def line(row: tuple[str, ...]) -> str:
        cells = [
            cell.ljust(width) if i < len(base) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule, *(line(r) for r in rows[1:])])


# --- junit ----------------------------------------------------------------------------


def _number(value: float) -> str:
    """Whole numbers without ``.0``; others in Python's shortest exact repr."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def junit_properties(record: Record) -> list[tuple[str, str]]:
    """``record_property`` pairs, prefixed so they never clash with other plugins'."""
    props = [
        ("virtio_device", record.device),
        ("virtio_workload", record.workload),
        ("virtio_accel", record.accel),
        ("virtio_iops", _number(record.iops)),
        ("virtio_bw_bytes", _number(record.bw)),
    ]
    if record.lat_p99_ns is not None:
        props.append(("virtio_lat_p99_ns", _number(record.lat_p99_ns)))
    props.extend((f"virtio_{key}", str(value)) for key, value in sorted(record.extra.items()))
    return props


# --- baselines ------------------------------------------------------------------------


def machine_id(hostname: str | None = None, cpuinfo: str | None = None) -> str:
    """``<hostname>-<hash of CPU model, count and arch>``: which numbers are comparable.

    The hostname keeps it readable; the hash changes when the same name moves to
    different hardware, which is exactly when old baselines stop meaning anything.
    """
    host = hostname if hostname is not None else socket.gethostname()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    models = re.findall(r"^model name\s*:\s*(.+?)\s*$", cpuinfo, flags=re.MULTILINE)
    fingerprint = f"{models[0] if models else platform.processor()}|{len(models)}|"
    fingerprint += platform.machine()
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:10]
    safe_host = re.sub(r"[^A-Za-z0-9.-]", "_", host) or "host"
    return f"{safe_host}-{digest}"


@dataclass(frozen=True)
class Baseline:
    """Saved records and the host they were measured on."""

    machine_id: str
    records: tuple[Record, ...]


def save_baseline(records: Iterable[Record], path: str | os.PathLike[str], machine_id: str) -> None:
    """Save ``records`` as the baseline for ``machine_id`` (records lacking a machine get it)."""
    stamped = [r if r.machine else _with_machine(r, machine_id) for r in records]
    doc = {
        "version": FORMAT_VERSION,
        "machine_id": machine_id,
        "records": [r.to_dict() for r in stamped],
    }
    _write_atomically(Path(path), json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _with_machine(record: Record, machine: str) -> Record:
    data = record.to_dict()
    data["machine"] = machine
    return Record.from_dict(data)


def load_baseline(path: str | os.PathLike[str]) -> Baseline:
    """Read a file written by :func:`save_baseline`; ConfigError names the file if bad."""
    text, data = _read_json(path, "baseline")
    if not isinstance(data, Mapping) or not isinstance(data.get("machine_id"), str):
        raise ConfigError(f"baseline {os.fspath(path)!r} has no machine_id")
    return Baseline(data["machine_id"], tuple(records_from_json(text)))


def parse_compare_fail(spec: str) -> dict[str, float]:
    """``"iops:10%,lat_p99:20%"`` → ``{"iops": 10.0, "lat_p99": 20.0}``."""
    allowed = ", ".join(COMPARE_METRICS)
    tolerances: dict[str, float] = {}
    items = [item for item in spec.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"compare-fail {spec!r} is empty; use e.g. 'iops:10%,lat_p99:20%'")
    for item in items:
        match = _FAIL_ITEM_RE.match(item)
        if match is None:
            raise ConfigError(
                f"compare-fail item {item.strip()!r} is not METRIC:PERCENT% "
                f"(e.g. 'iops:10%'); metrics: {allowed}"
            )
        metric, percent = match[1], float(match[2])
        if metric not in COMPARE_METRICS:
            raise ConfigError(f"compare-fail metric {metric!r} is not known; allowed: {allowed}")
        if metric in tolerances:
            raise ConfigError(f"compare-fail metric {metric!r} is given twice in {spec!r}")
        tolerances[metric] = percent
    return tolerances


@dataclass(frozen=True)
class Regression:
    """One metric that got worse than allowed for one (machine, accel, device, workload)."""

    machine: str
    accel: str
    device: str
    workload: str
    metric: str
    baseline: float
    current: float
    change_pct: float
    allowed_pct: float

    def __str__(self) -> str:
        fmt = {"iops": format_count, "bw": format_rate, "lat_p99": format_duration}[self.metric]
        return (
            f"{self.workload} on {self.device} ({self.accel}): {_METRIC_LABELS[self.metric]} "
            f"{fmt(self.current)} vs baseline {fmt(self.baseline)} "
            f"({self.change_pct:+.1f}%, allowed {self.allowed_pct:g}% worse)"
        )


def _means(records: Iterable[Record], attr: str, default_machine: str) -> dict[Key, float]:
    """Mean of ``attr`` per key; repeated measurements of one key are averaged."""
    sums: dict[Key, list[float]] = {}
    for record in records:
        value = getattr(record, attr)
        if value is None:
            continue
        key = (record.machine or default_machine, *record.key[1:])
        sums.setdefault(key, []).append(float(value))
    return {key: sum(values) / len(values) for key, values in sums.items()}


def compare(
    records: Iterable[Record], baseline: Baseline, fail_spec: str = "iops:10%"
) -> list[Regression]:
    """Regressions of ``records`` against ``baseline`` beyond ``fail_spec``'s tolerances.

    Keys present on one side only are ignored: a new test has nothing to regress
    from, and a removed one cannot regress.
    """
    tolerances = parse_compare_fail(fail_spec)
    current_records = list(records)
    found: list[Regression] = []
    for metric, allowed in tolerances.items():
        attr, higher_is_better = COMPARE_METRICS[metric]
        before = _means(baseline.records, attr, baseline.machine_id)
        after = _means(current_records, attr, baseline.machine_id)
        for key in sorted(before.keys() & after.keys()):
            old, new = before[key], after[key]
            if old == 0:
                continue
            change = (new - old) / old * 100
            worse = -change if higher_is_better else change
            if worse > allowed:
                found.append(Regression(*key, metric, old, new, change, allowed))
    return found


# --- command line: merge shards --------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pytest_virtio.report merge shard*.json [--plot F] [--json F]``.

    One verdict for a suite sharded across CI runners or xdist remote workers:
    every shard's records and relative checks are merged; (machine,
    accelerator) stay apart in the table, the chart and the relative checks.
    Exit status 1 when a relative check failed, 2 on bad input.
    """
    import argparse

    from pytest_virtio import plot, results

    parser = argparse.ArgumentParser(prog="python -m pytest_virtio.report")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="merge --virtio-json files and judge them together")
    merge.add_argument("shards", nargs="+", help="--virtio-json files of the shards")
    merge.add_argument("--plot", help="write the merged chart (.svg or .png)")
    merge.add_argument("--json", help="write the merged results JSON")
    merge.add_argument("--inconclusive", choices=("pass", "fail"), default="pass",
                       help="whether an inconclusive relative check fails (exit 1)")
    args = parser.parse_args(argv)
    merged = SessionResults()
    try:
        for shard in args.shards:
            one = load_session(shard)
            merged.records.extend(one.records)
            merged.checks.extend(one.checks)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    judgement = results.judge_relative(merged)
    print(f"{len(args.shards)} shard(s), {len(merged.records)} record(s), "
          f"machines: {', '.join(sorted({r.machine for r in merged.records})) or 'none'}")
    print(render_table(merged.records))
    for line in judgement.lines:
        print(line)
    verdicts = [line for line in judgement.lines[1:] if not line.startswith(" ")]
    if args.json:
        write_json(merged.records, args.json, merged.checks)
        print(f"results JSON written to {Path(args.json).resolve()}")
    if args.plot and merged.records:
        try:
            plot.write_chart(merged.records, args.plot, verdicts)
        except (ConfigError, OSError) as exc:
            print(f"chart NOT written to {args.plot}: {exc}", file=sys.stderr)
            return 2
        print(f"chart written to {Path(args.plot).resolve()}")
    return 1 if judgement.fails_session(args.inconclusive) else 0


if __name__ == "__main__":
    sys.exit(main())
