"""Results store: JSON round-trips (xdist transport), table, junit, baselines."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_virtio.errors import ConfigError
from pytest_virtio.guests.settings import Settings
from pytest_virtio.results.baseline import (
    DEFAULT_COMPARE_FAIL,
    Baseline,
    CompareFail,
    Regression,
    Tolerance,
    compare,
    load_baseline,
    machine_id,
    parse_compare_fail,
    save_baseline,
)
from pytest_virtio.results.records import (
    Record,
    Role,
    load_json,
    records_from_json,
    records_to_json,
    write_json,
)
from pytest_virtio.results.render import junit_properties, render_table
from pytest_virtio.workloads.fio import parse_fio_json

DATA = Path(__file__).parent / "data" / "fio"


def rec(device: str = "virtio-blk", iops: float = 15_000, **kw: object) -> Record:
    base = Record(
        test_id="test_randread[virtio-blk]",
        device=device,
        workload="randread",
        accel="tcg",
        machine="m1",
        iops=iops,
        bw=iops * 4096,
        lat_p99_ns=1_500_000,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_from_fio() -> None:
    result = parse_fio_json((DATA / "fio-3.33-randread.json").read_text())
    record = Record.from_fio("t", "virtio-blk", "randread", "kvm", "m1", result, {"iodepth": 8})
    assert record.iops == result.iops
    assert record.bw == result.bw
    assert record.lat_p99_ns == 358400
    assert record.extra == {"iodepth": 8}
    assert record.key == ("m1", "kvm", "virtio-blk", "randread")


def test_json_roundtrip_and_builtins_only() -> None:
    record = rec(extra={"iodepth": 16, "note": "x", "ok": True, "none": None})
    data = record.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert Record.from_dict(data) == record
    assert Record.from_json(record.to_json()) == record


_text = st.text(max_size=20)
_num = st.floats(min_value=0, max_value=1e12, allow_nan=False)


@given(
    st.builds(
        Record,
        test_id=_text,
        device=_text,
        workload=_text,
        accel=_text,
        machine=_text,
        iops=_num,
        bw=_num,
        lat_p99_ns=st.none() | _num,
        extra=st.dictionaries(_text.filter(lambda k: k not in TYPED),
                              st.none() | st.integers() | _text | st.booleans()),
        kind=st.sampled_from(("fio", "dd", "net")),
        sequential=st.booleans(),
        group=_text,
        pair=st.none() | _text,
        role=st.sampled_from(Role),
        cpu_starved=st.none() | st.floats(min_value=0, max_value=1),
    )
)
def test_json_roundtrip_property(record: Record) -> None:
    assert Record.from_json(record.to_json()) == record


TYPED = ("group", "pair", "role", "cpu_starved")


def test_group_pair_role_and_starvation_are_typed_fields_of_the_json() -> None:
    """They travel (xdist, --virtio-json, merge) as fields of their own type, not as
    ``extra`` entries that every reader had to fish out and convert."""
    record = rec(extra={"iodepth": 16}, group="t.py::test_rr", pair="t.py::test_rr[disk=vb]",
                 role=Role.REFERENCE, cpu_starved=0.25)
    data = json.loads(record.to_json())
    assert {k: data[k] for k in TYPED} == {
        "group": "t.py::test_rr", "pair": "t.py::test_rr[disk=vb]", "role": "reference",
        "cpu_starved": 0.25}
    assert data["extra"] == {"iodepth": 16}
    back = Record.from_json(record.to_json())
    assert back == record and back.role is Role.REFERENCE and back.cpu_starved == 0.25
    plain = Record.from_dict(rec().to_dict())
    assert (plain.group, plain.pair, plain.role, plain.cpu_starved) == (
        "", None, Role.MEASURED, None)


def test_version_1_records_with_the_fields_in_extra_still_load() -> None:
    data = rec().to_dict()
    for key in TYPED:
        del data[key]
    old = Record.from_dict({**data, "extra": {"group": "g", "pair": "t", "role": "reference",
                                              "cpu_starved": 1, "rounds": 3}})
    assert (old.group, old.pair, old.role, old.cpu_starved) == ("g", "t", Role.REFERENCE, 1.0)
    assert old.extra == {"rounds": 3}


def test_a_typed_field_in_extra_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"group is a field of Record; pass group=\.\.\."):
        rec(extra={"group": "g"})


def test_kind_and_sequential_are_fields_older_files_had_them_in_extra() -> None:
    data = rec().to_dict()
    del data["kind"], data["sequential"]
    old = Record.from_dict({**data, "extra": {"kind": "net", "sequential": True}})
    assert (old.kind, old.sequential) == ("net", True)
    assert (Record.from_dict(data).kind, Record.from_dict(data).sequential) == ("fio", False)


@pytest.mark.parametrize(
    "text",
    [
        "nope",
        "[]",
        '{"device": "x"}',
        json.dumps({**rec().to_dict(), "iops": "fast"}),
        json.dumps({**rec().to_dict(), "device": 3}),
        json.dumps({**rec().to_dict(), "extra": [1]}),
        json.dumps({**rec().to_dict(), "sequential": "yes"}),
        json.dumps({**rec().to_dict(), "role": "bystander"}),
        json.dumps({**rec().to_dict(), "cpu_starved": 2}),
        json.dumps({**rec().to_dict(), "group": None}),
    ],
)
def test_bad_record_json(text: str) -> None:
    with pytest.raises(ConfigError):
        Record.from_json(text)


def test_session_file_roundtrip(tmp_path: Path) -> None:
    records = [rec(), rec("ide", 5_400, lat_p99_ns=None)]
    path = tmp_path / "sub" / "results.json"
    write_json(records, path)
    assert load_json(path) == records
    assert json.loads(path.read_text())["version"] == 2
    assert records_from_json(json.dumps([r.to_dict() for r in records])) == records
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp left
    with pytest.raises(ConfigError, match="records"):
        records_from_json('{"version": 1}')
    assert records_from_json(records_to_json([])) == []


def test_render_table_aligned() -> None:
    table = render_table(
        [
            rec(),
            rec("ide", 5_412.4, test_id="test_randread[ide]", lat_p99_ns=None),
            rec("nvme", 123_456, test_id="test_randread[nvme]", lat_p99_ns=250_000),
        ]
    )
    lines = table.splitlines()
    assert lines[0].split() == [
        "test",
        "device",
        "workload",
        "accel",
        "IOPS",
        "bandwidth",
        "p99",
        "latency",
    ]
    assert set(lines[1]) == {"-", " "}
    assert "15,000" in lines[2] and "58.6 MiB/s" in lines[2] and "1.50 ms" in lines[2]
    assert "5,412" in lines[3] and lines[3].endswith("-")
    assert "123,456" in lines[4] and "482 MiB/s" in lines[4] and "250 µs" in lines[4]
    # numbers are right-aligned: every IOPS cell ends in the same column
    header_end = lines[0].index("IOPS") + len("IOPS")
    for row, value in zip(lines[2:], ["15,000", "5,412", "123,456"], strict=True):
        assert row.index(value) + len(value) == header_end


def test_render_empty() -> None:
    assert render_table([]) == "no I/O results recorded"


def test_junit_properties() -> None:
    props = junit_properties(rec(iops=4812.5, extra={"iodepth": 16}))
    assert props == [
        ("virtio_device", "virtio-blk"),
        ("virtio_workload", "randread"),
        ("virtio_accel", "tcg"),
        ("virtio_iops", "4812.5"),
        ("virtio_bw_bytes", "19712000"),
        ("virtio_lat_p99_ns", "1500000"),
        ("virtio_iodepth", "16"),
    ]
    assert all(isinstance(v, str) for _, v in props)
    # The typed fields keep the property names they had as extra entries.
    typed = junit_properties(rec(extra={"lat_mean_ns": 9.5}, group="g", cpu_starved=0.5))
    assert typed[-3:] == [("virtio_cpu_starved", "0.5"), ("virtio_group", "g"),
                          ("virtio_lat_mean_ns", "9.5")]
    assert ("virtio_lat_p99_ns", "1500000") not in junit_properties(rec(lat_p99_ns=None))


def test_machine_id() -> None:
    cpu = (
        "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n"
    )
    a = machine_id("ci-runner 3", cpu)
    assert a.startswith("ci-runner_3-")
    assert a == machine_id("ci-runner 3", cpu)
    assert a != machine_id("ci-runner 3", cpu.replace("7B13", "9654"))
    assert a != machine_id("ci-runner 3", cpu.split("processor\t: 1")[0])
    assert machine_id()  # the real host
    assert machine_id() == machine_id()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iops:10%", (Tolerance("iops", 10.0),)),
        ("iops:10%,lat_p99:20%", (Tolerance("iops", 10.0), Tolerance("lat_p99", 20.0))),
        (" bw : 2.5% , ", (Tolerance("bw", 2.5),)),
    ],
)
def test_parse_compare_fail(spec: str, expected: tuple[Tolerance, ...]) -> None:
    """Parsed once into numbers (the settings keep them), printed back as written."""
    parsed = parse_compare_fail(spec)
    assert parsed == CompareFail(expected)
    assert parse_compare_fail(str(parsed)) == parsed
    assert str(parse_compare_fail("iops:10%,lat_p99:20.5%")) == "iops:10%,lat_p99:20.5%"


def test_settings_hold_compare_fail_as_numbers() -> None:
    """Resolved once with the other settings: the session's end reads numbers, and a bad
    value is a usage error naming the option before any guest boots."""
    assert Settings.from_values({}).compare_fail == DEFAULT_COMPARE_FAIL
    resolved = Settings.from_values({"compare_fail": "lat_p99:20%, bw:2.5%"}).compare_fail
    assert resolved.tolerances == (Tolerance("lat_p99", 20.0), Tolerance("bw", 2.5))
    with pytest.raises(ConfigError, match=r"^--virtio-compare-fail: compare-fail metric 'x'"):
        Settings.from_values({"compare_fail": "x:1%"})


@pytest.mark.parametrize(
    ("spec", "word"),
    [
        ("", "empty"),
        ("iops", "'iops' is not METRIC:PERCENT%"),
        ("iops:10", "'iops:10'"),
        ("speed:10%", "'speed' is not known; allowed: iops, bw, lat_p99"),
        ("iops:10%,iops:5%", "twice"),
        ("iops:-1%", "'iops:-1%'"),
    ],
)
def test_parse_compare_fail_rejects(spec: str, word: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_compare_fail(spec)
    assert word in str(info.value)


def test_baseline_roundtrip_and_stamping(tmp_path: Path) -> None:
    path = tmp_path / "baseline.json"
    save_baseline([rec(), rec(machine="")], path, "m1")
    loaded = load_baseline(path)
    assert loaded.machine_id == "m1"
    assert [r.machine for r in loaded.records] == ["m1", "m1"]


def test_bad_baseline_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read baseline"):
        load_baseline(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_baseline(bad)
    bad.write_text('{"records": []}')
    with pytest.raises(ConfigError, match="no machine_id"):
        load_baseline(bad)


IOPS_10 = DEFAULT_COMPARE_FAIL
LAT_20 = CompareFail((Tolerance("lat_p99", 20.0),))


def test_compare_finds_iops_regression_only_beyond_tolerance() -> None:
    base = Baseline("m1", (rec(iops=10_000), rec("ide", 5_000)))
    now = [rec(iops=8_500), rec("ide", 4_600)]
    [reg] = compare(now, base, IOPS_10)
    assert (reg.device, reg.metric, reg.baseline, reg.current) == ("virtio-blk", "iops", 1e4, 8500)
    assert reg.change_pct == pytest.approx(-15.0)
    assert str(reg) == (
        "randread on virtio-blk (tcg): IOPS 8,500 vs baseline 10,000 (-15.0%, allowed 10% worse)"
    )


def test_compare_latency_higher_is_worse() -> None:
    base = Baseline("m1", (rec(lat_p99_ns=1_000_000),))
    assert compare([rec(lat_p99_ns=900_000)], base, LAT_20) == []
    both = parse_compare_fail("iops:10%,lat_p99:20%")
    [reg] = compare([rec(lat_p99_ns=1_300_000)], base, both)
    assert reg.metric == "lat_p99"
    assert "p99 latency 1.30 ms vs baseline 1 ms (+30.0%" in str(reg)


def test_compare_keys_never_cross_machine_or_accel() -> None:
    base = Baseline("m1", (rec(iops=10_000),))
    assert compare([rec(iops=1, machine="m2")], base) == []
    assert compare([rec(iops=1, accel="kvm")], base) == []
    assert compare([rec(iops=1, workload="randwrite")], base) == []
    assert compare([rec(iops=1, machine="")], base)  # unstamped records belong to this host


def test_compare_takes_the_median_of_repeats_and_skips_zero() -> None:
    base = Baseline("m1", (rec(iops=10_000), rec(iops=12_000), rec("ide", 0)))
    assert compare([rec(iops=10_000), rec(iops=10_000), rec("ide", 1)], base, IOPS_10) == []
    [reg] = compare([rec(iops=9_000)], base, IOPS_10)
    assert reg.baseline == 11_000
    # three rounds, one stalled by the host: the median (10,000) holds, a mean (7,000) would not
    assert compare([rec(iops=10_000), rec(iops=10_000), rec(iops=1_000)], base, IOPS_10) == []


def test_regression_is_data() -> None:
    reg = Regression("m", "tcg", "ide", "read", "bw", 2.0 * 1024**2, 1024**2, -50.0, 10.0)
    assert "bandwidth 1 MiB/s vs baseline 2 MiB/s (-50.0%" in str(reg)
