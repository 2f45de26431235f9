#!/usr/bin/env python3
"""Verdict stability: the demo's randread pair judged N times on a host kept busy.

Each repetition is one pytest session of the demo's 4k randread on IDE and
virtio-blk (``make demo``'s ``test_random_read`` promises, cut to that pair):
the throughput promise (virtio-blk >= 1.2x IDE's IOPS, ``rounds`` paired
rounds, inconclusive when the spreads straddle 1.2x) and the mechanism promise
(virtio-blk >= 10x fewer traps per I/O than IDE).  Two bounded CPU hogs
(``timeout N sh -c 'while :; do :; done'``, killed by PID afterwards) keep both
cores busy for the whole run, on top of whatever else the host runs.

Printed per promise: the measured ratio's min/median/max over the repetitions
and how many verdicts agree.  Target: the mechanism verdict agrees N/N; the
throughput verdict is never wrong — ``ok`` or ``inconclusive``, never
``FAILED`` (the peer of the mechanism figure is the throughput figure,
measured in the same sessions).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from pytest_virtio.results.perf import relative_outcomes
from pytest_virtio.results.records import Record, RelativeCheck

SUITE = """
import pytest

@pytest.mark.vm(disks=[{{"name": "disk0", "size": "256M"}}])
@pytest.mark.virtio_matrix(disk=["ide", "virtio-blk"])
@pytest.mark.workload("fio", disk="disk0", rw="randread", bs="4k", iodepth=16,
                      runtime="{runtime}s")
@pytest.mark.perf(faster_than={{"virtio-blk": "ide"}}, by={by}, rounds={rounds})
@pytest.mark.perf(faster_than={{"virtio-blk": "ide"}}, metric="traps_per_io", by={traps_by})
def test_random_read(guest, workload):
    assert workload.errors == 0
"""

PROMISES = (("throughput (IOPS)", "iops"), ("traps per I/O", "traps_per_io"))


def hogs(seconds: int) -> list[subprocess.Popen[bytes]]:
    """Two busy loops, one per core, each ended by ``timeout`` at the latest."""
    return [subprocess.Popen(["timeout", str(seconds), "sh", "-c", "while :; do :; done"])
            for _ in range(2)]


def session(work: Path, index: int, workers: int, timeout_scale: float) -> list[Record]:
    """One pytest session of the pair; its records (every round of both devices)."""
    out = work / f"run{index}.json"
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "--virtio-accel=tcg", f"--virtio-json={out}", "-n", str(workers),
            f"--virtio-timeout-scale={timeout_scale}"]
    proc = subprocess.run(args, cwd=work, capture_output=True, text=True)
    if not out.exists():
        sys.exit(f"run {index} wrote no results:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
    (work / f"run{index}.txt").write_text(proc.stdout)
    return [Record.from_dict(r) for r in json.loads(out.read_text())["records"]]


def verdict(records: list[Record], metric: str, by: float) -> tuple[str, float | None]:
    """The plugin's own session-end judgement (perf.relative_outcomes) of the promise;
    ``("no result", None)`` when a guest of the session did not boot or measure."""
    items = {r.test_id for r in records if r.device == "virtio-blk"}
    if len(items) != 1 or not any(r.device == "ide" for r in records):
        return "no result", None
    [mine] = items
    group = next(r.group for r in records)
    check = RelativeCheck(mine, group, "virtio-blk", records[0].workload, records[0].accel,
                          "ide", by, metric, records[0].machine)
    [outcome] = relative_outcomes(records, [check])
    return outcome.verdict.outcome, outcome.verdict.ratio


def starvation(records: list[Record]) -> float:
    """The worst share of runnable time a QEMU spent waiting for a CPU in a timed round."""
    return max((r.cpu_starved for r in records if r.cpu_starved is not None), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtime", type=int, default=2, help="fio seconds per round")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--by", type=float, default=1.2)
    parser.add_argument("--traps-by", type=float, default=10.0)
    parser.add_argument("--hog-seconds", type=int, default=3600)
    parser.add_argument("--timeout-scale", type=float, default=10.0,
                        help="guest timeouts (boot!) for a host this busy; TCG default is 4")
    args = parser.parse_args()
    factors = {"iops": args.by, "traps_per_io": args.traps_by}
    with tempfile.TemporaryDirectory(prefix="pvv", dir="/tmp") as tmp:
        work = Path(tmp)
        (work / "test_pair.py").write_text(SUITE.format(
            runtime=args.runtime, by=args.by, rounds=args.rounds, traps_by=args.traps_by))
        os.environ["TMPDIR"] = tmp
        busy = hogs(args.hog_seconds)
        results: dict[str, list[tuple[str, float | None]]] = {m: [] for _, m in PROMISES}
        start = time.monotonic()
        try:
            for i in range(args.repeat):
                records = session(work, i, args.workers, args.timeout_scale)
                for _, metric in PROMISES:
                    results[metric].append(verdict(records, metric, factors[metric]))
                line = ", ".join(f"{m} {o} {r:.2f}x" if r else f"{m} {o}"
                                 for m, (o, r) in ((m, results[m][-1]) for _, m in PROMISES))
                print(f"run {i + 1}/{args.repeat}: {line}; worst QEMU CPU starvation "
                      f"{starvation(records):.0%}", flush=True)
        finally:
            for proc in busy:
                proc.terminate()  # SIGTERM: timeout passes it on to its busy loop
                proc.wait()
        elapsed = time.monotonic() - start
    print(f"\n{args.repeat} sessions in {elapsed:.0f} s under 2 CPU hogs, rounds={args.rounds}, "
          f"fio {args.runtime} s per round, -n {args.workers}")
    for label, metric in PROMISES:
        ratios = [r for _, r in results[metric] if r is not None]
        counts = Counter(o for o, _ in results[metric])
        agree = counts.most_common(1)[0][1] if counts else 0
        lo, med, hi = (min(ratios), statistics.median(ratios), max(ratios)) if ratios else (0,) * 3
        print(f"{label:18} required {factors[metric]:g}x  ratio min {lo:.2f}x  median "
              f"{med:.2f}x  max {hi:.2f}x  verdicts {dict(counts)}  agree "
              f"{agree}/{args.repeat}  wrong (FAILED) {counts.get('FAILED', 0)}")


if __name__ == "__main__":
    main()
