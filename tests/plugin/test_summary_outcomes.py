"""pytest's last line counts the session-end verdicts in words its own parser reads.

No guest: the inner test files the records a measured workload would (as
test_perf_plugin's starved case does), so the relative checks and the baseline
comparison are judged at session end exactly as after real workloads.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_virtio.results.baseline import machine_id, save_baseline
from pytest_virtio.results.records import Record

FILED = """
import pytest
from pytest_virtio.plugin.state import RESULTS_KEY
from pytest_virtio.results.baseline import machine_id
from pytest_virtio.results.records import Record, RelativeCheck

WORKLOAD = "randread 4K qd16"


def _file(request, group, starved=None):
    # virtio-blk at 100 IOPS promised 2x an IDE at 1000: FAILED; starved: INCONCLUSIVE.
    results = request.config.stash[RESULTS_KEY]
    for device, iops in (("virtio-blk", 100.0), ("ide", 1000.0)):
        results.records.append(Record(request.node.nodeid, device, WORKLOAD, "tcg",
                                      machine_id(), iops=iops, bw=0.0, group=group,
                                      cpu_starved=starved))
    results.checks.append(RelativeCheck(request.node.nodeid, group, "virtio-blk", WORKLOAD,
                                        "tcg", "ide", by=2.0, machine=machine_id()))


def test_slower(request):
    _file(request, "slower")


def test_starved(request):
    _file(request, "starved", starved=0.9)
"""


def test_session_verdicts_are_one_word_outcomes(pytester: pytest.Pytester,
                                                tmp_path: Path) -> None:
    """``2 passed, 1 perf_failed, 1 perf_inconclusive, 1 baseline_regressed``: with
    "relative perf failed" pytest's parser saw ``relative`` (and ``baseline``)."""
    baseline = tmp_path / "baseline.json"
    save_baseline([Record("old", "virtio-blk", "randread 4K qd16", "tcg", machine_id(),
                          iops=1e9, bw=0.0)], baseline, machine_id())
    pytester.makepyfile(FILED)
    result = pytester.runpytest("--virtio-accel=tcg", "-p", "no:cacheprovider",
                                f"--virtio-compare={baseline}")
    assert result.parseoutcomes() == {"passed": 2, "perf_failed": 1,
                                      "perf_inconclusive": 1, "baseline_regressed": 1}
    result.stdout.fnmatch_lines(["FAILED *virtio-blk vs ide*", "INCONCLUSIVE *virtio-blk vs ide*",
                                 "REGRESSION *virtio-blk*"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
