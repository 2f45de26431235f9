#!/usr/bin/env python3
"""Parallel speed-up: wall time of an 8-guest suite at -n 0, 1, 2 (pytest-xdist).

What a CI owner gets from ``pytest -n``: each worker boots its own guests, so
the suite should scale with cores until the CPUs are saturated (TCG guests are
CPU-bound).  The peer is the same suite without xdist (-n 0), measured in the
same run.  Target on the project's 2-core machines: >= 1.6x at -n 2 vs -n 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = """
import pytest

@pytest.mark.parametrize("i", range({n}))
def test_guest(guest, i):
    assert guest.check("cat /proc/version").stdout.startswith("Linux version")
"""


def run_suite(workdir: Path, workers: int, accel: str) -> float:
    """Wall time of one inner pytest run; fails loudly if a test did not pass."""
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            f"--virtio-accel={accel}"]
    if workers:
        args += ["-n", str(workers)]
    start = time.monotonic()
    proc = subprocess.run(args, cwd=workdir, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"-n {workers} failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=8)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--accel", default="tcg")
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved rounds; the best of each is kept (noisy hosts)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pvb", dir="/tmp") as tmp:
        work = Path(tmp)
        (work / "test_suite.py").write_text(SUITE.format(n=args.tests))
        os.environ["TMPDIR"] = tmp  # short socket paths, private run roots
        run_suite(work, 0, args.accel)  # warm: image, initramfs, page cache
        workers = [int(w) for w in args.workers.split(",")]
        times: dict[int, float] = {}
        for _ in range(args.rounds):
            for n in workers:
                t = run_suite(work, n, args.accel)
                times[n] = min(t, times.get(n, t))
    base = times.get(0) or next(iter(times.values()))
    print(f"{args.tests} guest tests, accel {args.accel}, {os.cpu_count()} CPUs, "
          f"load avg before last run {os.getloadavg()[0]:.2f}")
    for n, t in times.items():
        print(f"  -n {n}: {t:6.1f} s wall   speed-up vs -n 0: {base / t:4.2f}x")


if __name__ == "__main__":
    main()
