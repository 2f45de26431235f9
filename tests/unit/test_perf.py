"""perf marker: validation, absolute thresholds per accelerator, relative comparisons."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pytest_virtio.errors import ConfigError
from pytest_virtio.results.perf import PerfSpec, check_absolute, check_relative, metric_value
from pytest_virtio.workloads.fio import FioResult, IoStats, parse_fio_json

DATA = Path(__file__).parent / "data" / "fio"


def result(
    iops: float, *, bw: float = 0.0, p99: float | None = 1e5, mean: float = 5e4
) -> FioResult:
    read = IoStats(
        iops=iops, bw_bytes=bw, lat_mean_ns=mean, lat_p99_ns=p99, total_ios=max(1, int(iops))
    )
    return FioResult(read=read, write=IoStats())


def test_empty_spec_checks_nothing() -> None:
    spec = PerfSpec.from_kwargs({})
    assert check_absolute(spec, result(1), "tcg", "ide") == []
    assert check_relative(spec, {}, "ide") == []


def test_min_iops_failure_line_matches_contract() -> None:
    spec = PerfSpec.from_kwargs({"min_iops": 10_000})
    lines = check_absolute(spec, result(4812.3), "tcg", "virtio-blk", workload="randread")
    assert lines == ["randread on virtio-blk: IOPS 4,812 < required 10,000 (tcg)"]
    assert check_absolute(spec, result(10_000), "tcg", "virtio-blk") == []


def test_per_accelerator_values() -> None:
    spec = PerfSpec.from_kwargs({"min_iops": {"kvm": "40k", "tcg": "10k"}})
    assert check_absolute(spec, result(20_000), "tcg", "virtio-blk") == []
    [line] = check_absolute(spec, result(20_000), "kvm", "virtio-blk", workload="randread")
    assert line.endswith("IOPS 20,000 < required 40,000 (kvm)")


def test_accelerator_left_out_means_unbounded() -> None:
    spec = PerfSpec.from_kwargs({"min_iops": {"kvm": 40_000}})
    assert check_absolute(spec, result(1), "tcg", "virtio-blk") == []


def test_bandwidth_and_latency_lines() -> None:
    spec = PerfSpec.from_kwargs(
        {"min_bw": "200MiB/s", "max_lat_p99": "2ms", "max_lat_mean": {"tcg": "100us"}}
    )
    slow = result(100, bw=120 * 1024**2, p99=2_240_000, mean=150_000)
    lines = check_absolute(spec, slow, "tcg", "ide", workload="read")
    assert lines == [
        "read on ide: bandwidth 120 MiB/s < required 200 MiB/s (tcg)",
        "read on ide: p99 latency 2.24 ms > allowed 2 ms (tcg)",
        "read on ide: mean latency 150 µs > allowed 100 µs (tcg)",
    ]
    kvm = check_absolute(spec, slow, "kvm", "ide", workload="read")
    assert kvm == [line.replace("(tcg)", "(kvm)") for line in lines[:2]]


def test_missing_percentile_is_a_failure_not_a_pass() -> None:
    spec = PerfSpec.from_kwargs({"max_lat_p99": "1ms"})
    [line] = check_absolute(spec, result(100, p99=None), "tcg", "ide", workload="randread")
    assert "p99 latency not reported by fio" in line


def test_workload_name_from_fio_jobs() -> None:
    real = parse_fio_json((DATA / "fio-3.33-randread.json").read_text())
    spec = PerfSpec.from_kwargs({"min_iops": "1M"})
    [line] = check_absolute(spec, real, "kvm", "virtio-blk")
    assert line.startswith("randread on virtio-blk: IOPS 78,219 < required 1,000,000 (kvm)")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"min_iop": 1}, ["mark.perf", "'min_iop'", "min_iops", "max_lat_p99", "faster_than"]),
        ({"min_iops": {"xen": 1}}, ["min_iops", "unknown key 'xen'", "'kvm', 'tcg'"]),
        ({"min_iops": {}}, ["min_iops", "kvm, tcg"]),
        ({"min_iops": "lots"}, ["min_iops", "'lots'"]),
        ({"min_bw": [1]}, ["min_bw", "[1]"]),
        ({"max_lat_p99": "2 fortnights"}, ["max_lat_p99", "'2 fortnights'"]),
        ({"faster_than": ""}, ["faster_than"]),
        ({"faster_than": "ide", "by": 0}, ["by", "0"]),
        ({"faster_than": "ide", "by": "2"}, ["by", "'2'"]),
        ({"faster_than": "ide", "by": True}, ["by"]),
        ({"by": 2.0}, ["'by' needs 'faster_than'"]),
        ({"faster_than": "ide", "metric": "speed"}, ["metric", "'speed'", "iops, bw"]),
    ],
)
def test_bad_marker_arguments(kwargs: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        PerfSpec.from_kwargs(kwargs)
    for word in words:
        assert word in str(info.value)


def test_positional_arguments_rejected() -> None:
    with pytest.raises(ConfigError, match="keyword arguments only"):
        PerfSpec.from_marker((10_000,), {})
    assert PerfSpec.from_marker((), {"min_iops": 1}).min_iops == (("*", 1.0),)


def test_spec_is_hashable() -> None:
    a = PerfSpec.from_kwargs({"min_iops": {"kvm": 1, "tcg": 2}, "faster_than": "ide"})
    assert hash(a) == hash(
        PerfSpec.from_kwargs({"min_iops": {"kvm": 1, "tcg": 2}, "faster_than": "ide"})
    )


def test_relative_iops() -> None:
    spec = PerfSpec.from_kwargs({"faster_than": "ide", "by": 2.0})
    runs = {"ide": result(5_400), "virtio-blk": result(15_000)}
    assert check_relative(spec, runs, "virtio-blk") == []
    slow = {"ide": result(5_400), "virtio-blk": result(9_000)}
    [line] = check_relative(spec, slow, "virtio-blk", workload="randread")
    assert line == "randread on virtio-blk: IOPS 9,000 vs ide 5,400 is 1.67x; required 2x"


def test_relative_latency_is_lower_better() -> None:
    spec = PerfSpec.from_kwargs({"faster_than": "ide", "by": 2, "metric": "lat_p99"})
    ok = {"ide": result(1, p99=4e6), "virtio-blk": result(1, p99=1e6)}
    assert check_relative(spec, ok, "virtio-blk") == []
    bad = {"ide": result(1, p99=4e6), "virtio-blk": result(1, p99=3e6)}
    [line] = check_relative(spec, bad, "virtio-blk", workload="randread")
    assert "p99 latency 3 ms vs ide 4 ms is 1.33x; required 2x" in line


def test_relative_missing_results_fail() -> None:
    spec = PerfSpec.from_kwargs({"faster_than": "ide"})
    [line] = check_relative(spec, {"virtio-blk": result(1)}, "virtio-blk", workload="randread")
    assert "no result for ide (have: virtio-blk)" in line
    [line] = check_relative(spec, {}, "virtio-blk")
    assert "no result for virtio-blk, ide (have: none)" in line


def test_relative_against_itself_fails() -> None:
    spec = PerfSpec.from_kwargs({"faster_than": "ide"})
    [line] = check_relative(spec, {"ide": result(1)}, "ide")
    assert "names the device itself" in line


def test_relative_unreported_metric() -> None:
    spec = PerfSpec.from_kwargs({"faster_than": "ide", "metric": "lat_p99"})
    runs = {"ide": result(1, p99=None), "virtio-blk": result(1)}
    [line] = check_relative(spec, runs, "virtio-blk")
    assert "fio did not report it" in line


def test_relative_zero_reference() -> None:
    spec = PerfSpec.from_kwargs({"faster_than": "ide", "by": 2})
    assert check_relative(spec, {"ide": result(0), "virtio-blk": result(1)}, "virtio-blk") == []


def test_metric_value() -> None:
    r = replace(result(10, bw=5.0), write=IoStats(iops=5, bw_bytes=1.0, total_ios=5))
    assert metric_value(r, "iops") == 15
    assert metric_value(r, "bw") == 6.0
    assert metric_value(FioResult(IoStats(), IoStats()), "lat_mean") is None
    with pytest.raises(ConfigError):
        metric_value(r, "speed")
