"""workload/perf markers and the session report, as a user meets them.

Collection errors need no guest.  The rest boot real (TCG) guests in an inner
pytest run: short fio jobs on virtio-blk/IDE data disks, ~5-8 s per guest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pytest_virtio.results.baseline import machine_id, save_baseline
from pytest_virtio.results.records import Record

TCG = "--virtio-accel=tcg"

QUICK = 'rw="randread", bs="4k", iodepth=4, runtime="1s"'


def _errors(pytester: pytest.Pytester, marks: str) -> str:
    pytester.makepyfile(f"import pytest\n{marks}\ndef test_x(guest):\n    pass\n")
    result = pytester.runpytest(TCG)
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "Traceback" not in out
    return out


@pytest.mark.parametrize(
    ("marks", "expected"),
    [
        ('@pytest.mark.workload("fio", disk="disk0", iodepht=4)',
         ["@pytest.mark.workload", "'iodepht'", "iodepth"]),
        ('@pytest.mark.workload("fio", rw="randreed")', ["workload", "randreed", "randread"]),
        ('@pytest.mark.workload("bonnie")', ["workload", "fio, dd, iperf3"]),
        ('@pytest.mark.workload("iperf3", port=1)', ["workload", "'port'", "seconds"]),
        ('@pytest.mark.workload("fio")\n@pytest.mark.perf(min_iopz=1)',
         ["@pytest.mark.perf", "'min_iopz'", "min_iops"]),
        ('@pytest.mark.workload("fio")\n@pytest.mark.perf(max_lat_p99="2 fortnights")',
         ["max_lat_p99", "fortnights"]),
        ("@pytest.mark.perf(min_iops=1)", ["perf needs @pytest.mark.workload"]),
        ('@pytest.mark.virtio_matrix(disk=["virtio-blk"])\n@pytest.mark.workload("fio")\n'
         '@pytest.mark.perf(faster_than="ide")', ["faster_than", "'ide'", "virtio_matrix"]),
        ('@pytest.mark.workload("iperf3")\n@pytest.mark.perf(min_iops=1)',
         ["min_iops", "iperf3", "does not measure IOPS"]),
    ],
)
def test_bad_marker_is_collection_error(
    pytester: pytest.Pytester, marks: str, expected: list[str]
) -> None:
    out = _errors(pytester, marks)
    for text in expected:
        assert text in out, f"{text!r} missing from:\n{out}"


@pytest.mark.parametrize(
    ("option", "text"),
    [("--virtio-compare-fail=iops:ten", "--virtio-compare-fail"),
     ("--virtio-plot=chart.gif", "--virtio-plot")],
)
def test_bad_report_option_is_usage_error(
    pytester: pytest.Pytester, option: str, text: str
) -> None:
    result = pytester.runpytest(option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{text}*"])


def test_perf_failure_and_fio_error_are_readable(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus: object
) -> None:
    """A missed threshold prints measured vs required and the device; a fio that fails in
    the guest shows fio's own complaint."""
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.vm(disks=[{{"name": "disk0", "bus": "virtio-blk"}}])
        @pytest.mark.workload("fio", disk="disk0", {QUICK})
        @pytest.mark.perf(min_iops={{"tcg": "50M", "kvm": "50M"}}, max_lat_p99="1ns")
        def test_too_slow(guest, workload):
            assert workload.iops > 0

        @pytest.mark.vm(disks=[{{"name": "disk0", "bus": "virtio-blk"}}])
        @pytest.mark.workload("fio", disk="disk0", {QUICK}, extra={{"ioscheduler": "bogus"}})
        def test_fio_fails(guest, workload):
            pass
        """
    )
    # The miss is judged even if the loaded host starved QEMU: on a busy runner the
    # default policy reports it as a PerfInconclusiveWarning instead (that path has
    # its own test, test_absolute_miss_on_a_starved_guest_is_inconclusive), and this
    # test is about how the failure reads.
    result = pytester.runpytest_subprocess(TCG, "-p", "no:cacheprovider",
                                           "--virtio-perf-inconclusive=fail")
    result.assert_outcomes(failed=1, errors=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*performance below threshold:*",
        "*randread 4K qd4 on virtio-blk: IOPS * < required 50,000,000 (tcg)*",
        "*randread 4K qd4 on virtio-blk: p99 latency * > allowed 1 ns (tcg)*",
    ])
    assert "WorkloadError" in out and "fio" in out
    assert "bogus" in out  # fio's complaint about the option, from the guest
    assert find_qemus(inner_tmp) == []


MEASURED_TEST = f"""
import pytest

@pytest.mark.vm(disks=[{{"name": "disk0", "bus": "virtio-blk"}}])
@pytest.mark.workload("fio", disk="disk0", {QUICK})
def test_measured(guest):
    pass
"""


def test_table_json_plot_baseline_and_compare_fail(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus: object, tmp_path: Path
) -> None:
    """One run writes every output; a baseline claiming far more IOPS makes it fail."""
    baseline = tmp_path / "baseline.json"
    impossible = Record("old", "virtio-blk", "randread 4K qd4", "tcg", machine_id(),
                        iops=1e9, bw=1e12, lat_p99_ns=1.0)
    save_baseline([impossible], baseline, machine_id())
    pytester.makepyfile(MEASURED_TEST)
    out_json, chart, saved = tmp_path / "r.json", tmp_path / "c.svg", tmp_path / "saved.json"
    result = pytester.runpytest_subprocess(
        TCG, "-p", "no:cacheprovider", f"--virtio-json={out_json}", f"--virtio-plot={chart}",
        f"--virtio-save={saved}", f"--virtio-compare={baseline}",
        "--virtio-compare-fail=iops:10%,lat_p99:50%",
    )
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # the regression fails the session
    result.stdout.fnmatch_lines(["*= 1 passed, 1 baseline_regressed in *"])
    result.stdout.fnmatch_lines([
        "*pytest-virtio results*",
        "test*device*workload*accel*IOPS*bandwidth*p99 latency*",
        "*test_measured*virtio-blk*randread 4K qd4*tcg*",
        "*1 comparable result(s)*",
        "REGRESSION randread 4K qd4 on virtio-blk (tcg): IOPS * vs baseline 1,000,000,000*",
        "REGRESSION randread 4K qd4 on virtio-blk (tcg): p99 latency*",
        f"results JSON written to {out_json}",
        f"chart written to {chart}",
    ])
    [record] = json.loads(out_json.read_text())["records"]
    assert record["device"] == "virtio-blk" and record["iops"] > 0
    assert record["group"].endswith("::test_measured") and "group" not in record["extra"]
    assert record["role"] == "measured" and record["pair"] is None
    assert "<svg" in chart.read_text() and "virtio-blk" in chart.read_text()
    assert json.loads(saved.read_text())["machine_id"] == machine_id()
    assert find_qemus(inner_tmp) == []


def test_junit_properties(pytester: pytest.Pytester, inner_tmp: Path, tmp_path: Path) -> None:
    pytester.makepyfile(MEASURED_TEST)
    xml = tmp_path / "junit.xml"
    result = pytester.runpytest_subprocess(TCG, "-p", "no:cacheprovider", f"--junitxml={xml}")
    result.assert_outcomes(passed=1)
    text = xml.read_text()
    assert '<property name="virtio_device" value="virtio-blk"' in text
    assert '<property name="virtio_iops"' in text


def test_two_workers_one_report_and_relative_check(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus: object, tmp_path: Path
) -> None:
    """Matrix items on different xdist workers: one table, and the relative check
    (judged in the controller) sees both devices."""
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.vm(disks=[{{"name": "disk0"}}])
        @pytest.mark.virtio_matrix(disk=["ide", "virtio-blk"])
        @pytest.mark.workload("fio", disk="disk0", {QUICK})
        @pytest.mark.perf(faster_than="ide", by=1000, metric="traps_per_io")
        def test_pair(guest):
            pass
        """
    )
    out_json = tmp_path / "r.json"
    result = pytester.runpytest_subprocess(
        TCG, "-p", "no:cacheprovider", "-n", "2", "-v", f"--virtio-json={out_json}"
    )
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    assert "[gw0]" in out and "[gw1]" in out  # really two workers
    result.stdout.fnmatch_lines([
        "*test_pair?disk=ide?*ide*randread 4K qd4*",
        "*test_pair?disk=virtio-blk?*virtio-blk*randread 4K qd4*",
        # Counted, so the verdict is the same on a loaded host (a timed one could be
        # inconclusive there: see test_timed_verdict_on_starved_samples_is_inconclusive).
        "FAILED *virtio-blk vs ide (randread 4K qd4, traps_per_io, tcg): *x, required 1000x",
        "*traps per I/O * vs ide * is *x; required 1000x",
        # pytest's last line says why the session failed, not just "2 passed".
        "*= 2 passed, 1 perf_failed in *",
    ])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    records = json.loads(out_json.read_text())["records"]
    assert sorted(r["device"] for r in records) == ["ide", "virtio-blk"]
    # Mechanism metrics counted by QEMU's trace events for the device under test:
    # IDE's task-file + BMDMA registers cost far more accesses per read than a virtio notify.
    traps = {r["device"]: r["traps_per_io"] for r in records}
    assert traps["ide"] > 10 * traps["virtio-blk"] > 0
    # How starved each QEMU was while timed (its threads' run-queue wait share).
    assert all(0 <= r["cpu_starved"] <= 1 for r in records)
    assert find_qemus(inner_tmp) == []


def test_remote_workers_in_their_own_directory_home_and_cache(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus: object, tmp_path: Path
) -> None:
    """xdist remote workers (``--tx popen//chdir=...``): each worker runs in another
    directory with its own HOME, image cache and TMPDIR; the controller still gets
    one table, one JSON and one verdict from both matrix items."""
    remote, home, cache = tmp_path / "remote", tmp_path / "home", tmp_path / "cache"
    worker_tmp = Path(tempfile.mkdtemp(prefix="pvr", dir="/tmp"))
    home.mkdir()
    # The worker's own cache: hard links of the built image (GiBs; a link costs nothing),
    # so nothing is shared by path with the controller's cache.
    with contextlib.suppress(shutil.Error):  # a concurrent build's temporary vanished
        shutil.copytree(os.environ["PYTEST_VIRTIO_CACHE"], cache, copy_function=os.link)
    pytester.makepyfile(
        f"""
        import os
        import pytest

        @pytest.mark.vm(disks=[{{"name": "disk0"}}])
        @pytest.mark.virtio_matrix(disk=["ide", "virtio-blk"])
        @pytest.mark.workload("fio", disk="disk0", {QUICK})
        @pytest.mark.perf(faster_than={{"virtio-blk": "ide"}}, metric="traps_per_io", by=5)
        def test_pair(guest):
            assert os.getcwd() == {str(remote)!r}
            assert os.environ["HOME"] == {str(home)!r}
            assert str(guest.run_dir).startswith({str(worker_tmp)!r})
        """
    )
    out_json = tmp_path / "all.json"
    tx = (f"2*popen//chdir={remote}//env:HOME={home}//env:PYTEST_VIRTIO_CACHE={cache}"
          f"//env:TMPDIR={worker_tmp}")
    try:
        result = pytester.runpytest_subprocess(
            TCG, "-p", "no:cacheprovider", "-d", f"--tx={tx}", f"--rsyncdir={pytester.path}",
            f"--virtio-json={out_json}", "-W", "ignore::DeprecationWarning",
        )
        result.assert_outcomes(passed=2)
        result.stdout.fnmatch_lines([
            "*pytest-virtio results*",
            "ok *virtio-blk vs ide (randread 4K qd4, traps_per_io, tcg): *x, required 5x",
        ])
        assert result.ret == pytest.ExitCode.OK
        records = json.loads(out_json.read_text())["records"]
        assert sorted(r["device"] for r in records) == ["ide", "virtio-blk"]
        assert all(r["traps_per_io"] for r in records)
        assert find_qemus(worker_tmp) == []
    finally:
        shutil.rmtree(worker_tmp, ignore_errors=True)


STARVED_TEST = """
import pytest
from pytest_virtio.plugin.state import RESULTS_KEY
from pytest_virtio.results.records import Record

@pytest.mark.workload("fio")
@pytest.mark.perf(min_iops=10_000)
def test_starved(request):
    # What the runner files for a round timed while QEMU waited for a CPU 90% of the
    # time it was runnable (Record.cpu_starved, from /proc/PID/task/*/schedstat).
    request.config.stash[RESULTS_KEY].records.append(Record(
        request.node.nodeid, "ide", "randread 4K qd16", "tcg", "m", iops=500, bw=0.0,
        cpu_starved={share}))
"""


@pytest.mark.parametrize(("share", "policy", "outcome"), [
    (0.9, "pass", "passed"), (0.9, "fail", "failed"), (0.2, "pass", "failed")])
def test_absolute_miss_on_a_starved_guest_is_inconclusive(
    pytester: pytest.Pytester, share: float, policy: str, outcome: str
) -> None:
    pytester.makepyfile(STARVED_TEST.replace("{share}", str(share)))
    result = pytester.runpytest(TCG, "-p", "no:cacheprovider",
                                f"--virtio-perf-inconclusive={policy}")
    result.assert_outcomes(**{outcome: 1}, warnings=1 if outcome == "passed" else 0)
    text = result.stdout.str()
    assert "IOPS 500 < required 10,000 (tcg)" in text
    assert ("waited for a CPU 90%" in text) == (share == 0.9)
    if outcome == "passed":
        assert "PerfInconclusiveWarning" in text and "not judged (inconclusive)" in text
