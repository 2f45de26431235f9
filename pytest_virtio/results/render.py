"""The session's figures for people: the terminal table and junit properties.

One row per result (test, device, workload, accelerator, and machine when
several): the median of its rounds with ``[min..max]``, through the one metrics
table's formats.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pytest_virtio.results.metrics import MECHANISM, METRICS, spread
from pytest_virtio.results.records import JsonScalar, Record, Role

__all__ = ["group_samples", "junit_properties", "render_table"]

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
    if metric == "iops" and samples[0].kind == "net":
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
    extras = {**record.extra, **_set_labels(record)}
    props.extend((f"virtio_{key}", str(value)) for key, value in sorted(extras.items()))
    return props


def _set_labels(record: Record) -> dict[str, JsonScalar]:
    """The record's group, pairing and starvation, where set, under the property names
    they had when they travelled in ``extra``."""
    labels: dict[str, JsonScalar] = {
        "group": record.group or None, "pair": record.pair, "cpu_starved": record.cpu_starved,
        "role": Role.REFERENCE.value if record.role is Role.REFERENCE else None}
    return {key: value for key, value in labels.items() if value is not None}
