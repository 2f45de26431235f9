"""The session's end: judge the collected results and write every requested output.

plugin.py's hooks stay one-liners by calling here.  Runs once, in the process
that has every record: a plain run, or the xdist controller after each worker
shipped its :class:`~pytest_virtio.report.SessionResults`.  That is also why
relative checks (``perf(faster_than=...)``) are judged here and not in the
test: the reference device's item may have run in another worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import perf as perf_mod
from . import plot as plot_mod
from . import report
from .errors import ConfigError, VirtioError
from .report import Record, SessionResults
from .settings import Settings

__all__ = ["absolute_failures", "finish", "summary_lines"]


def absolute_failures(marker: Any, record: Record) -> list[str]:
    """The ``perf`` marker's thresholds against one test's record (empty: all met)."""
    spec = perf_mod.PerfSpec.from_marker(tuple(marker.args), marker.kwargs)
    return perf_mod.check_absolute(spec, record, record.accel, record.device,
                                   workload=record.workload)


def _relative_lines(results: SessionResults) -> tuple[list[str], bool]:
    lines: list[str] = []
    failed = False
    for check, ratio, failures in perf_mod.relative_outcomes(results.records, results.checks):
        shown = "n/a" if ratio is None else f"{ratio:.2f}x"
        verdict = "FAILED" if failures else "ok"
        lines.append(
            f"{verdict:6} {check.device} vs {check.faster_than} ({check.workload}, "
            f"{check.metric}, {check.accel}): {shown}, required {check.by:g}x"
        )
        for failure in failures:
            failed = True
            lines.append(f"       {check.test_id}: {failure}")
    if lines:
        lines.insert(0, "relative performance (perf faster_than, judged at session end):")
    return lines, failed


def _compare_lines(records: Sequence[Record], settings: Settings) -> tuple[list[str], bool]:
    if settings.compare is None:
        return [], False
    try:
        baseline = report.load_baseline(settings.compare)
    except ConfigError as exc:
        return [f"baseline comparison FAILED: {exc}"], True
    regressions = report.compare(records, baseline, settings.compare_fail)
    here = {r.key for r in records}
    matched = sum(1 for r in baseline.records if r.key in here)
    head = (f"baseline {os.fspath(settings.compare)} (machine {baseline.machine_id}): "
            f"{matched} comparable result(s), tolerance {settings.compare_fail}")
    if matched == 0:
        head += " — nothing to compare (other machine, accelerator or workloads?)"
    lines = [head] + [f"REGRESSION {r}" for r in regressions]
    return lines, bool(regressions)


def _write_outputs(records: Sequence[Record], settings: Settings) -> list[str]:
    """Write JSON, baseline and chart; a failed write is reported, never a traceback."""
    lines: list[str] = []
    def save(path: Path) -> None:
        report.save_baseline(records, path, report.machine_id())

    def chart(path: Path) -> None:
        plot_mod.write_chart(records, path)

    def json_file(path: Path) -> None:
        report.write_json(records, path)

    writers: list[tuple[str, Path | None, Callable[[Path], None]]] = [
        ("results JSON", settings.json, json_file),
        ("baseline", settings.save, save),
        ("chart", settings.plot, chart),
    ]
    for what, path, write in writers:
        if path is None:
            continue
        if what == "chart" and not records:
            lines.append(f"{what} not written to {path}: no workload results")
            continue
        try:
            write(path)
        except (VirtioError, OSError) as exc:
            lines.append(f"{what} NOT written to {path}: {exc}")
        else:
            lines.append(f"{what} written to {path.resolve()}")
    return lines


def finish(results: SessionResults, settings: Settings) -> tuple[list[str], bool]:
    """Judge and write; returns the summary lines and whether the session must fail."""
    rel_lines, rel_failed = _relative_lines(results)
    cmp_lines, cmp_failed = _compare_lines(results.records, settings)
    out_lines = _write_outputs(results.records, settings)
    return rel_lines + cmp_lines + out_lines, rel_failed or cmp_failed


def summary_lines(results: SessionResults, outcome: Sequence[str]) -> list[str]:
    """The table (sorted by test id, so -n 2 and -n 0 print alike) and the verdicts."""
    records = sorted(results.records, key=lambda r: (r.test_id, r.device, r.workload))
    lines = report.render_table(records).splitlines() if records else []
    if outcome:
        lines.append("")
        lines.extend(outcome)
    return lines

