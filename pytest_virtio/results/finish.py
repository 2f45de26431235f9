"""The session's end: judge the collected results and write every requested output.

plugin.py's hooks stay one-liners by calling here.  Runs once, in the process
that has every record: a plain run, or the xdist controller after each worker
shipped its :class:`~pytest_virtio.results.records.SessionResults`.  That is also why
relative checks (``perf(faster_than=...)``) are judged here and not in the
test: the reference device's item may have run in another worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pytest_virtio.errors import ConfigError, VirtioError
from pytest_virtio.results import baseline as baseline_mod
from pytest_virtio.results import perf as perf_mod
from pytest_virtio.results import plot as plot_mod
from pytest_virtio.results.crash import CrashCount, crash_lines
from pytest_virtio.results.plot import VerdictLine
from pytest_virtio.results.records import Record, RelativeCheck, SessionResults, write_json
from pytest_virtio.results.render import render_table

__all__ = ["Finish", "FinishOptions", "Judgement", "absolute_failures", "finish", "judge_relative",
           "summary_lines"]



class FinishOptions(Protocol):
    """What the session's end reads from the run's options.

    :class:`pytest_virtio.guests.settings.Settings` is one; a Protocol keeps
    ``results`` below the guests wing (import-linter's layers in pyproject).
    """

    @property
    def json(self) -> Path | None: ...
    @property
    def plot(self) -> Path | None: ...
    @property
    def save(self) -> Path | None: ...
    @property
    def compare(self) -> Path | None: ...
    @property
    def compare_fail(self) -> baseline_mod.CompareFail: ...
    @property
    def perf_inconclusive(self) -> str: ...


def absolute_failures(spec: perf_mod.PerfSpec, records: Sequence[Record]) -> list[str]:
    """One ``perf`` promise's thresholds against one test's records (empty: all met);
    with rounds, against the best round (see :meth:`Record.best_of`)."""
    record = Record.best_of(records)
    failures = perf_mod.check_absolute(spec, record, record.accel, record.device,
                                       workload=record.workload)
    starved = starvation(records)
    if failures and starved is not None:
        failures.append(f"(the host was too busy to time this: QEMU waited for a CPU "
                        f"{starved:.0%} of the time it was runnable, even in its least "
                        "starved round)")
    return failures


def starvation(records: Sequence[Record]) -> float | None:
    """How starved QEMU was in the least starved round, when over perf.STARVED_LIMIT
    in every round (None: at least one round was timed on a host that let it run)."""
    shares = [r.cpu_starved for r in records if r.cpu_starved is not None]
    if shares and min(shares) > perf_mod.STARVED_LIMIT:
        return min(shares)
    return None


@dataclass(frozen=True)
class Judgement:
    """The session-end relative verdicts: lines to print, what they add up to, and
    one typed verdict per check for the chart."""

    lines: tuple[str, ...] = ()
    failed: int = 0
    inconclusive: int = 0
    verdicts: tuple[VerdictLine, ...] = ()

    def fails_session(self, inconclusive_policy: str) -> bool:
        return bool(self.failed or (self.inconclusive and inconclusive_policy == "fail"))


def _ratio_text(verdict: perf_mod.Verdict) -> str:
    if verdict.ratio is None:
        return "n/a"
    if verdict.rounds[0] > 1 or verdict.rounds[1] > 1:
        return (f"{verdict.ratio:.2f}x (range {verdict.low:.2f}x..{verdict.high:.2f}x, "
                f"{verdict.rounds[0]}+{verdict.rounds[1]} samples)")
    return f"{verdict.ratio:.2f}x"


def judge_relative(results: SessionResults) -> Judgement:
    """Judge every ``faster_than`` check of the session (also used by ``report merge``)."""
    lines: list[str] = []
    verdicts: list[VerdictLine] = []
    failed = inconclusive = 0
    for outcome in perf_mod.relative_outcomes(results.records, results.checks):
        check, verdict = outcome.check, outcome.verdict
        failed += verdict.outcome == perf_mod.FAILED
        inconclusive += verdict.outcome == perf_mod.INCONCLUSIVE
        line = (f"{verdict.outcome.label:12} {check.device} vs {check.faster_than} "
                f"({check.workload}, {check.metric}, {check.accel}): {_ratio_text(verdict)}, "
                f"required {check.by:g}x")
        verdicts.append(VerdictLine(verdict.outcome, line))
        lines.append(line)
        lines.extend(f"             {check.test_id}: {failure}" for failure in outcome.failures)
    if lines:
        lines.insert(0, "relative performance (perf faster_than, judged at session end):")
    return Judgement(tuple(lines), failed, inconclusive, tuple(verdicts))


def _compare_lines(records: Sequence[Record], settings: FinishOptions) -> tuple[list[str], bool]:
    if settings.compare is None:
        return [], False
    try:
        baseline = baseline_mod.load_baseline(settings.compare)
    except ConfigError as exc:
        return [f"baseline comparison FAILED: {exc}"], True
    regressions = baseline_mod.compare(records, baseline, settings.compare_fail)
    here = {r.key for r in records}
    matched = sum(1 for r in baseline.records if r.key in here)
    head = (f"baseline {os.fspath(settings.compare)} (machine {baseline.machine_id}): "
            f"{matched} comparable result(s), tolerance {settings.compare_fail}")
    if matched == 0:
        head += " — nothing to compare (other machine, accelerator or workloads?)"
    lines = [head] + [f"REGRESSION {r}" for r in regressions]
    return lines, bool(regressions)


def _write_outputs(records: Sequence[Record], settings: FinishOptions,
                   verdicts: Sequence[VerdictLine] = (),
                   checks: Sequence[RelativeCheck] = (),
                   crash: Sequence[CrashCount] = ()) -> list[str]:
    """Write JSON, baseline and chart; a failed write is reported, never a traceback."""
    lines: list[str] = []
    def save(path: Path) -> None:
        baseline_mod.save_baseline(records, path, baseline_mod.machine_id())

    def chart(path: Path) -> None:
        plot_mod.write_chart(records, path, verdicts)

    def json_file(path: Path) -> None:
        write_json(records, path, checks, crash)

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


#: The categories pytest's last line gets from the session end (relative checks
#: failed or inconclusive, a baseline comparison that found regressions).
STAT_PERF_FAILED = "perf_failed"
STAT_PERF_INCONCLUSIVE = "perf_inconclusive"
STAT_REGRESSED = "baseline_regressed"


@dataclass(frozen=True)
class Finish:
    """What the session end decided: lines to print, and why the session fails."""

    lines: tuple[str, ...]
    judgement: Judgement
    regressions: bool
    inconclusive_policy: str = "pass"

    @property
    def failed(self) -> bool:
        return self.judgement.fails_session(self.inconclusive_policy) or self.regressions

    def stats(self) -> dict[str, int]:
        """Counts for pytest's last line ("2 passed, 1 perf_failed in 40s").

        One word per category, as pytest-rerunfailures' ``rerun``: pytest's own
        parser (``RunResult.parseoutcomes``, a ``count word`` regex) and CI log
        parsers read "2 relative perf inconclusive" as ``relative: 2``.
        """
        counts = {STAT_PERF_FAILED: self.judgement.failed,
                  STAT_PERF_INCONCLUSIVE: self.judgement.inconclusive,
                  STAT_REGRESSED: int(self.regressions)}
        return {k: v for k, v in counts.items() if v}


def finish(results: SessionResults, settings: FinishOptions) -> Finish:
    """Judge and write; the summary lines and whether (and why) the session must fail."""
    judgement = judge_relative(results)
    cmp_lines, cmp_failed = _compare_lines(results.records, settings)
    out_lines = _write_outputs(results.records, settings, judgement.verdicts, results.checks,
                               results.crash)
    return Finish((*judgement.lines, *cmp_lines, *out_lines), judgement, cmp_failed,
                  settings.perf_inconclusive)


def summary_lines(results: SessionResults, outcome: Sequence[str]) -> list[str]:
    """The table (sorted by test id, so -n 2 and -n 0 print alike), the crash-state
    counts and the verdicts."""
    records = sorted(results.records, key=lambda r: (r.test_id, r.device, r.workload))
    lines = render_table(records).splitlines() if records else []
    crash = crash_lines(results.crash)
    if crash:
        lines.extend(["", *crash] if lines else crash)
    if outcome:
        lines.append("")
        lines.extend(outcome)
    return lines

