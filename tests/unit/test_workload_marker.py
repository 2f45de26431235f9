"""workload marker validation, the runner against a fake guest, relative checks, xdist data."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_virtio.errors import ConfigError, WorkloadError
from pytest_virtio.guests.measure import WorkloadSpec, run_workload
from pytest_virtio.results.perf import PerfSpec, check_applicable, relative_outcomes
from pytest_virtio.results.plot import build_panels
from pytest_virtio.results.records import Record, RelativeCheck, Role, SessionResults
from pytest_virtio.workloads.fio import FioJob, FioResult, check_fio_run

DATA = Path(__file__).parent / "data" / "fio"


def test_fio_defaults_and_name() -> None:
    spec = WorkloadSpec.from_marker(("fio",), {})
    assert spec.target == "disk0" and isinstance(spec.job, FioJob) and spec.job.time_based
    assert spec.name == "randread 4K qd16"
    seq = WorkloadSpec.from_marker(("fio",), {"rw": "write", "bs": "1M", "iodepth": 4})
    assert seq.name == "write 1M qd4"


@pytest.mark.parametrize(
    ("args", "kwargs", "text"),
    [
        (("fio",), {"iodepht": 1}, "'iodepht'"),
        (("fio",), {"bs": "huge"}, "bs='huge'"),
        (("dd",), {"direction": "sideways"}, "sideways"),
        (("iperf3",), {"seconds": -1}, "seconds"),
        ((), {}, "fio, dd, iperf3"),
        (("fio",), {"jobfile": "rw=read"}, "jobfile"),
    ],
)
def test_bad_workload_marker(args: tuple[Any, ...], kwargs: dict[str, Any], text: str) -> None:
    with pytest.raises(ConfigError, match="workload") as info:
        WorkloadSpec.from_marker(args, kwargs)
    assert text in str(info.value)


class FakeGuest:
    """Just enough Guest for the runner: a spec, a disk path and canned fio output."""

    timeout_scale = 1.0

    def __init__(self, fio_json: str, rc: int = 0, stderr: str = "") -> None:
        self.spec = SimpleNamespace(disks=[SimpleNamespace(name="disk0", bus="ahci")], nics=[])
        self.fio_json, self.rc, self.stderr = fio_json, rc, stderr
        self.fio_calls: list[FioJob] = []

    def default_timeout(self) -> float:
        return 30.0

    def disk_path(self, name: str) -> str:
        assert name == "disk0"
        return "/dev/sda"

    def fio(self, device: FioJob, timeout: float | None = None) -> FioResult:
        self.fio_calls.append(device)
        return check_fio_run(self.rc, self.fio_json, self.stderr)

    def dd(self, *a: Any, **k: Any) -> Any:
        raise AssertionError("not used")

    def run(self, cmd: str, timeout: float | None = None, via: str = "console") -> Any:
        raise AssertionError("not used")


def _any_fio_json() -> str:
    return sorted(DATA.glob("*.json"))[0].read_text()


def test_runner_files_result_under_the_disk_bus() -> None:
    guest = FakeGuest(_any_fio_json())
    measured = run_workload(guest, WorkloadSpec.from_marker(("fio",), {"runtime": "2s"}))
    assert measured.device == "ahci" and measured.workload == "randread 4K qd16"
    assert guest.fio_calls[0].filename == "/dev/sda" and guest.fio_calls[0].runtime == "2s"
    record = measured.to_record("t.py::test_x[disk=ahci]", "tcg", "t.py::test_x")
    assert record.group == "t.py::test_x" and record.iops == measured.iops
    assert record.cpu_starved is None and "group" not in record.extra


def test_runner_fio_failure_carries_stderr() -> None:
    guest = FakeGuest("", rc=1, stderr="fio: unrecognized option 'bogus'")
    with pytest.raises(WorkloadError, match="bogus"):
        run_workload(guest, WorkloadSpec.from_marker(("fio",), {}))


def test_runner_names_missing_disk() -> None:
    guest = FakeGuest(_any_fio_json())
    with pytest.raises(ConfigError, match=r"no disk named 'data'.*disk0"):
        run_workload(guest, WorkloadSpec.from_marker(("fio",), {"disk": "data"}))


def test_reference_for_string_and_pairs() -> None:
    one = PerfSpec.from_kwargs({"faster_than": "ide"})
    assert one.reference_for("virtio-blk") == "ide" and one.reference_for("ide") is None
    pairs = PerfSpec.from_kwargs({"faster_than": {"virtio-scsi": "ahci"}})
    assert pairs.reference_for("virtio-scsi") == "ahci" and pairs.reference_for("ide") is None
    with pytest.raises(ConfigError, match="faster_than"):
        PerfSpec.from_kwargs({"faster_than": {"ide": "ide"}})


def test_check_applicable_refuses_unmeasurable() -> None:
    with pytest.raises(ConfigError, match="iperf3 workload does not measure IOPS"):
        check_applicable(PerfSpec.from_kwargs({"faster_than": "e1000"}), "iperf3")
    check_applicable(PerfSpec.from_kwargs({"faster_than": "e1000", "metric": "bw"}), "iperf3")


def _rec(device: str, iops: float, group: str = "g", test: str = "t") -> Record:
    return Record(test, device, "randread", "tcg", "m", iops=iops, bw=iops * 4096,
                  group=group)


def test_relative_outcomes_compare_medians_and_stay_in_group() -> None:
    records = [_rec("ide", 1000), _rec("virtio-blk", 1500), _rec("virtio-blk", 2500),
               _rec("ide", 10, group="other")]
    check = RelativeCheck("t", "g", "virtio-blk", "randread", "tcg", "ide", by=2.6)
    [outcome] = relative_outcomes(records, [check])
    assert outcome.ratio == pytest.approx(2.0)
    assert outcome.verdict.outcome == "FAILED"
    assert outcome.failures == (
        "randread on virtio-blk: IOPS 2,000 (median of 2, 1,500..2,500) vs ide 1,000 is "
        "2.00x (range 1.50x..2.50x); required 2.6x",)
    # The factor inside the spread: neither pass nor fail.
    straddled = RelativeCheck("t", "g", "virtio-blk", "randread", "tcg", "ide", by=2.0)
    [outcome] = relative_outcomes(records, [straddled])
    assert outcome.verdict.outcome == "inconclusive"
    assert "inconclusive" in outcome.failures[0]
    missing = RelativeCheck("t", "g", "virtio-blk", "randread", "tcg", "ahci")
    [outcome] = relative_outcomes(records, [missing])
    assert outcome.ratio is None and "no result for ahci" in outcome.failures[0]


def test_session_results_survive_the_xdist_trip() -> None:
    results = SessionResults([_rec("ide", 1)], [RelativeCheck("t", "g", "a", "w", "tcg", "ide")])
    merged = SessionResults()
    merged.merge_dict(results.to_dict())
    merged.merge_dict(results.to_dict())
    assert merged.records == results.records * 2 and merged.checks == results.checks * 2


def test_network_records_get_their_own_panel_in_bits() -> None:
    net = Record("t", "virtio-net", "iperf3 tcp host→guest", "tcg", "m", iops=0.0,
                 bw=10e6, kind="net")
    [panel] = build_panels([net])
    assert panel.y_label == "throughput (Mbit/s)"
    [(_, [bar])] = panel.groups
    assert bar.value == pytest.approx(80.0)


def test_stacked_promises_on_one_item_are_all_judged() -> None:
    """Two trap promises of one item (vs IDE and vs AHCI) stay two checks, and a
    reference measured alongside (paired rounds) does not hide the other one."""
    records = [_rec("ide", 1000), _rec("ahci", 1000),
               dataclasses.replace(_rec("virtio-blk", 3000), pair="t"),
               dataclasses.replace(_rec("ide", 1000), pair="t", role=Role.REFERENCE)]
    checks = [RelativeCheck("t", "g", "virtio-blk", "randread", "tcg", "ide", by=2.0),
              RelativeCheck("t", "g", "virtio-blk", "randread", "tcg", "ahci", by=2.0)]
    outcomes = relative_outcomes(records, checks)
    assert [(o.check.faster_than, o.verdict.outcome) for o in outcomes] == [
        ("ide", "ok"), ("ahci", "ok")]


def test_timed_verdict_on_starved_samples_is_inconclusive() -> None:
    """A QEMU that waited for a CPU most of the time it was runnable measured the
    host's load: the timed verdict says so instead of failing (or passing)."""
    def starved(device: str, iops: float, share: float) -> Record:
        return dataclasses.replace(_rec(device, iops), cpu_starved=share)

    check = RelativeCheck("t", "g", "virtio-blk", "randread", "tcg", "ide", by=1.2)
    calm = [starved("ide", 1000, 0.2), starved("virtio-blk", 500, 0.3)]
    [outcome] = relative_outcomes(calm, [check])
    assert outcome.verdict.outcome == "FAILED"
    busy = [starved("ide", 1000, 0.2), starved("virtio-blk", 500, 0.93)]
    [outcome] = relative_outcomes(busy, [check])
    assert outcome.verdict.outcome == "inconclusive"
    assert "waited for a CPU 93%" in outcome.failures[0]
    # Counted metrics do not care how busy the host was.
    traps = dataclasses.replace(check, metric="traps_per_io")
    counted = [dataclasses.replace(r, traps_per_io=t) for r, t in zip(busy, (26.0, 0.5),
                                                                        strict=True)]
    [outcome] = relative_outcomes(counted, [traps])
    assert outcome.verdict.outcome == "ok"


def test_absolute_failure_on_a_starved_guest_says_the_host_was_busy() -> None:
    from pytest_virtio.results.finish import absolute_failures
    from pytest_virtio.results.perf import PerfSpec

    marker = PerfSpec.from_marker((), {"min_iops": 10_000})
    busy = [dataclasses.replace(_rec("ide", 500), cpu_starved=0.9)]
    assert "QEMU waited for a CPU 90%" in absolute_failures(marker, busy)[-1]
    calm = [dataclasses.replace(_rec("ide", 500), cpu_starved=0.1)]
    [line] = absolute_failures(marker, calm)
    assert "IOPS 500 < required 10,000" in line
