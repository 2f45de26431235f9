"""Baselines: records saved per machine, and regressions of a run against them.

``--virtio-save-baseline`` writes one; ``--virtio-compare`` reads one back and
``--virtio-compare-fail`` says how much worse a metric may get.  Numbers are
compared only within one machine id (host name + CPU fingerprint): figures from
other hardware mean nothing here.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pytest_virtio.errors import ConfigError
from pytest_virtio.results.metrics import METRICS, spread
from pytest_virtio.results.records import (
    FORMAT_VERSION,
    Key,
    Record,
    read_json_file,
    records_from_json,
    write_atomically,
)

__all__ = ["COMPARE_METRICS", "DEFAULT_COMPARE_FAIL", "Baseline", "CompareFail", "Regression",
           "Tolerance", "compare", "load_baseline", "machine_id", "parse_compare_fail",
           "save_baseline"]

#: The metrics (of the one table, :data:`~pytest_virtio.results.metrics.METRICS`) a
#: baseline comparison may be asked about.
COMPARE_METRICS = ("iops", "bw", "lat_p99")
_FAIL_ITEM_RE = re.compile(r"^\s*([a-z0-9_]+)\s*:\s*(\d+(?:\.\d+)?)\s*%\s*$")


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
    write_atomically(Path(path), json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _with_machine(record: Record, machine: str) -> Record:
    data = record.to_dict()
    data["machine"] = machine
    return Record.from_dict(data)


def load_baseline(path: str | os.PathLike[str]) -> Baseline:
    """Read a file written by :func:`save_baseline`; ConfigError names the file if bad."""
    text, data = read_json_file(path, "baseline")
    if not isinstance(data, Mapping) or not isinstance(data.get("machine_id"), str):
        raise ConfigError(f"baseline {os.fspath(path)!r} has no machine_id")
    return Baseline(data["machine_id"], tuple(records_from_json(text)))


@dataclass(frozen=True)
class Tolerance:
    """How much worse than its baseline one metric may get: ``iops:10%``."""

    metric: str
    percent: float

    def __str__(self) -> str:
        return f"{self.metric}:{self.percent:g}%"


@dataclass(frozen=True)
class CompareFail:
    """``--virtio-compare-fail`` as numbers: one tolerance per metric, in the order given.

    Printed back as the option is written (``iops:10%,lat_p99:20%``)."""

    tolerances: tuple[Tolerance, ...]

    def __str__(self) -> str:
        return ",".join(map(str, self.tolerances))


#: ``--virtio-compare-fail``'s default: IOPS may drop 10%.
DEFAULT_COMPARE_FAIL = CompareFail((Tolerance("iops", 10.0),))


def parse_compare_fail(spec: str) -> CompareFail:
    """``"iops:10%,lat_p99:20%"`` → ``CompareFail((Tolerance("iops", 10.0),
    Tolerance("lat_p99", 20.0)))``; parsed once, when the settings are resolved."""
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
    return CompareFail(tuple(Tolerance(m, p) for m, p in tolerances.items()))


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
        metric = METRICS[self.metric]
        fmt = metric.fmt
        return (
            f"{self.workload} on {self.device} ({self.accel}): {metric.label} "
            f"{fmt(self.current)} vs baseline {fmt(self.baseline)} "
            f"({self.change_pct:+.1f}%, allowed {self.allowed_pct:g}% worse)"
        )


def _medians(records: Iterable[Record], metric: str, default_machine: str) -> dict[Key, float]:
    """``metric`` per key; repeated measurements of one key give their median (``spread``),
    the same central figure the perf checks and the table use."""
    samples: dict[Key, list[float | None]] = {}
    for record in records:
        key = (record.machine or default_machine, *record.key[1:])
        samples.setdefault(key, []).append(record.value(metric))
    return {key: s.median for key, values in samples.items()
            if (s := spread(values)) is not None}


def compare(
    records: Iterable[Record], baseline: Baseline, fail: CompareFail = DEFAULT_COMPARE_FAIL
) -> list[Regression]:
    """Regressions of ``records`` against ``baseline`` beyond ``fail``'s tolerances.

    Keys present on one side only are ignored: a new test has nothing to regress
    from, and a removed one cannot regress.
    """
    current_records = list(records)
    found: list[Regression] = []
    for metric, allowed in ((t.metric, t.percent) for t in fail.tolerances):
        higher_is_better = METRICS[metric].higher_is_better
        before = _medians(baseline.records, metric, baseline.machine_id)
        after = _medians(current_records, metric, baseline.machine_id)
        for key in sorted(before.keys() & after.keys()):
            old, new = before[key], after[key]
            if old == 0:
                continue
            change = (new - old) / old * 100
            worse = -change if higher_is_better else change
            if worse > allowed:
                found.append(Regression(*key, metric, old, new, change, allowed))
    return found
