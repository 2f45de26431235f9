"""Result records: what one measured workload produced, as plain data, and its JSON.

One :class:`Record` per measured workload (one round).  Records are plain data that survive
JSON, because under pytest-xdist each worker measures its own guests and ships
its records to the controller through ``workeroutput`` (execnet carries only
builtins); the controller then renders one table for the whole session.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pytest_virtio.errors import ConfigError
from pytest_virtio.results.crash import CrashCount
from pytest_virtio.results.metrics import METRICS, spread
from pytest_virtio.workloads.fio import FioResult

__all__ = [
    "Record",
    "RelativeCheck",
    "Role",
    "SessionResults",
    "load_json",
    "records_from_json",
    "records_to_json",
    "write_json",
]

#: 2: ``group``, ``pair``, ``role`` and ``cpu_starved`` are fields of a record; version 1
#: files carried them in ``extra`` and are still read.
FORMAT_VERSION = 2

_T = TypeVar("_T")

JsonScalar = str | int | float | bool | None

Key = tuple[str, str, str, str]


class Role(enum.StrEnum):
    """Why a record was measured: for its own test, or as the reference device of a
    paired run (rounds alternated with another item's, :attr:`Record.pair`)."""

    MEASURED = "measured"
    REFERENCE = "reference"


#: Record fields that version 1 files (and hand-built records) kept in ``extra``.
_TYPED_EXTRAS = ("group", "pair", "role", "cpu_starved")


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
    #: What produced it: ``"fio"``, ``"dd"`` or ``"net"`` (iperf3); the table and the
    #: chart pick columns and panels by it.
    kind: str = "fio"
    #: Streaming I/O, judged by bandwidth in the chart: what the job ran, not its label.
    sequential: bool = False
    #: The test function (node id without the matrix part): relative checks compare
    #: only records of one group.  Empty for a record measured outside a test.
    group: str = ""
    #: The node id of the test whose rounds this record alternated with (paired
    #: rounds, see plugin/marked_workload.py); None when it was measured on its own.
    pair: str | None = None
    role: Role = Role.MEASURED
    #: Share of QEMU's runnable time it spent waiting for a CPU while timed (None:
    #: not measured); over perf.STARVED_LIMIT the timed verdict is inconclusive.
    cpu_starved: float | None = None

    def __post_init__(self) -> None:
        typed = [key for key in _TYPED_EXTRAS if key in self.extra]
        if typed:
            raise ConfigError(f"Record(extra={{{typed[0]!r}: ...}}): {typed[0]} is a field of "
                              f"Record; pass {typed[0]}=... instead")

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
        """The figure ``metric`` (a key of :data:`pytest_virtio.results.metrics.METRICS`)."""
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
            "kind": self.kind,
            "sequential": self.sequential,
            "group": self.group,
            "pair": self.pair,
            "role": self.role.value,
            "cpu_starved": self.cpu_starved,
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
                extra={k: v for k, v in extra.items() if k not in _TYPED_EXTRAS},
                **{name: _optional_float(data, name) for name in _MECHANISM_FIELDS},
                kind=_carried(data, extra, "kind", str, "fio"),
                sequential=_carried(data, extra, "sequential", bool, False),
                group=_carried(data, extra, "group", str, ""),
                pair=_carried_optional(data, extra, "pair", str),
                role=Role(_carried(data, extra, "role", str, Role.MEASURED.value)),
                cpu_starved=_share(data.get("cpu_starved", extra.get("cpu_starved"))),
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


def _carried(data: Mapping[str, Any], extra: Mapping[str, Any], key: str,
             kind: type[_T], default: _T) -> _T:
    """A typed field; files written before it was one carried it in ``extra``."""
    value = data.get(key, extra.get(key, default))
    if not isinstance(value, kind):
        raise TypeError(f"{key} must be a {kind.__name__}, got {value!r}")
    return value


def _carried_optional(data: Mapping[str, Any], extra: Mapping[str, Any], key: str,
                      kind: type[_T]) -> _T | None:
    """As :func:`_carried`, for a field that may be null (absent: null)."""
    value = data.get(key, extra.get(key))
    return None if value is None else _carried({key: value}, {}, key, kind, value)


def _share(value: object) -> float | None:
    """A fraction from 0 to 1 (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise TypeError(f"cpu_starved must be a number from 0 to 1, got {value!r}")
    return float(value)


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


def records_to_json(records: Iterable[Record], checks: Iterable[RelativeCheck] = (),
                    crash: Iterable[CrashCount] = ()) -> str:
    """A whole session's records (and its relative checks, so shards can be merged and
    judged later, and its crash-state counts) as one JSON document (the
    ``--virtio-json`` format)."""
    return json.dumps(
        {"version": FORMAT_VERSION, "records": [r.to_dict() for r in records],
         "checks": [c.to_dict() for c in checks], "crash": [c.to_dict() for c in crash]},
        indent=2,
        sort_keys=True,
    )


def read_json_file(path: str | os.PathLike[str], what: str) -> tuple[str, Any]:
    """A JSON file's text and value; ConfigError naming ``what`` and the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {os.fspath(path)!r}: {exc.strerror}") from None
    return text, _loads(text, f"{what} {os.fspath(path)!r}")


def load_session(path: str | os.PathLike[str]) -> SessionResults:
    """A ``--virtio-json`` file as SessionResults (records and checks); errors name it."""
    text, data = read_json_file(path, "results file")
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


def write_atomically(path: Path, text: str) -> None:
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
               checks: Iterable[RelativeCheck] = (), crash: Iterable[CrashCount] = ()) -> None:
    """Write :func:`records_to_json` to ``path`` atomically."""
    write_atomically(Path(path), records_to_json(records, checks, crash) + "\n")


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
    crash: list[CrashCount] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"records": [r.to_dict() for r in self.records],
                "checks": [c.to_dict() for c in self.checks],
                "crash": [c.to_dict() for c in self.crash]}

    def merge_dict(self, data: Mapping[str, Any]) -> None:
        self.records.extend(Record.from_dict(r) for r in data.get("records") or ())
        self.checks.extend(RelativeCheck.from_dict(c) for c in data.get("checks") or ())
        self.crash.extend(CrashCount.from_dict(c) for c in data.get("crash") or ())
