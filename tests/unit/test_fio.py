"""fio job → command, fio output → FioResult, against recorded real fio output."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from pytest_virtio.errors import ConfigError, WorkloadError
from pytest_virtio.workloads.fio import (
    FioJob,
    FioResult,
    IoStats,
    check_fio_run,
    fio_argv,
    fio_jobfile_shell,
    fio_shell,
    parse_fio_json,
)

DATA = Path(__file__).parent / "data" / "fio"


def read(name: str) -> str:
    return (DATA / name).read_text()


# --- job → argv -----------------------------------------------------------------------


def test_argv_golden() -> None:
    job = FioJob("/dev/vdb", runtime=5, time_based=True, size="1G")
    assert fio_argv(job) == [
        "fio",
        "--name=job",
        "--filename=/dev/vdb",
        "--rw=randread",
        "--bs=4k",
        "--iodepth=16",
        "--ioengine=libaio",
        "--direct=1",
        "--numjobs=1",
        "--size=1G",
        "--runtime=5s",
        "--time_based=1",
        "--output-format=json",
    ]


def test_argv_normalises_sizes_and_runtime() -> None:
    job = FioJob("/dev/vdb", bs=1048576, size="1024k", runtime="1500ms", verify="crc32c")
    argv = fio_argv(job)
    assert "--bs=1M" in argv
    assert "--size=1M" in argv
    assert "--runtime=1500ms" in argv
    assert "--verify=crc32c" in argv


def test_extra_options_are_appended_in_order() -> None:
    job = FioJob("/dev/vdb", rw="randrw", extra={"rwmixread": 70, "group_reporting": True})
    assert fio_argv(job)[-3:] == ["--rwmixread=70", "--group_reporting=1", "--output-format=json"]


def test_shell_quotes_hostile_filename() -> None:
    job = FioJob("/mnt/my disk/$(reboot)")
    line = fio_shell(job)
    assert shlex.split(line) == fio_argv(job)
    assert "'--filename=/mnt/my disk/$(reboot)'" in line


def test_job_is_hashable_and_comparable() -> None:
    a = FioJob("/dev/vdb", extra={"rwmixread": 70})
    b = FioJob("/dev/vdb", extra={"rwmixread": 70})
    assert a == b
    assert hash(a) == hash(b)
    assert FioJob("/dev/vdb", rw="read").sequential
    assert not a.sequential


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"rw": "randomread"}, ["rw='randomread'", "randread", "randwrite"]),
        ({"bs": "4q"}, ["bs='4q'", "4k"]),
        ({"bs": 0}, ["bs=0"]),
        ({"size": "lots"}, ["size='lots'"]),
        ({"iodepth": 0}, ["iodepth=0"]),
        ({"numjobs": True}, ["numjobs=True"]),
        ({"ioengine": "windowsaio"}, ["ioengine='windowsaio'", "libaio"]),
        ({"verify": "crc99"}, ["verify='crc99'", "crc32c"]),
        ({"direct": 2}, ["direct=2"]),
        ({"runtime": "soon"}, ["runtime='soon'"]),
        ({"runtime": 0}, ["runtime=0"]),
        ({"name": "My Job"}, ["name='My Job'"]),
        ({"filename": ""}, ["filename=''"]),
        ({"extra": {"--bad": 1}}, ["'--bad'"]),
        ({"extra": {"x": 1.5}}, ["x=1.5"]),
        ({"extra": {"x": "a\nb"}}, ["newline"]),
    ],
)
def test_bad_job_raises_config_error_naming_key(
    kwargs: dict[str, object], words: list[str]
) -> None:
    args = {"filename": "/dev/vdb", **kwargs}
    with pytest.raises(ConfigError) as info:
        FioJob(**args)  # type: ignore[arg-type]
    for word in words:
        assert word in str(info.value)


# --- job files ------------------------------------------------------------------------


def test_jobfile_shell_is_one_line_and_roundtrips() -> None:
    text = "[global]\nfilename=/dev/vdb\n# 100% \\ odd 'quote'\n[a]\nrw=randread\nbs=4k"
    line = fio_jobfile_shell(text)
    assert "\n" not in line
    assert line.endswith("| fio --output-format=json -")
    printf_arg = shlex.split(line)[1]
    out = subprocess.run(["printf", printf_arg], capture_output=True, text=True, check=True)
    assert out.stdout == text + "\n"


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("rw=read\n", "before any [section]"),
        ("filename=/dev/vdb\n[a]\n", "before any [section]"),
        ("", "no [section]"),
        ("[a]\nrw=sideways\n", "rw='sideways'"),
        ("[a]\nbs=4q\n", "bs='4q'"),
        ("[a]\n!!\n", "line 2"),
        ("[a]\x00", "NUL"),
    ],
)
def test_bad_jobfile(text: str, word: str) -> None:
    with pytest.raises(ConfigError, match=word.replace("[", r"\[").replace("]", r"\]")):
        fio_jobfile_shell(text)


def test_jobfile_accepts_split_bs_and_comments() -> None:
    assert fio_jobfile_shell("; comment\n[a]\nbs=4k,64k\nbsrange=4k-16k\ntime_based\n")


# --- JSON → result --------------------------------------------------------------------


def test_randread_3_33() -> None:
    result = parse_fio_json(read("fio-3.33-randread.json"))
    assert result.fio_version == "fio-3.33"
    assert result.read.iops == pytest.approx(78218.781219)
    assert result.read.bw_bytes == 320384127
    assert result.read.io_bytes == 320704512
    assert result.read.runtime_ms == 1001
    assert result.read.lat_mean_ns == pytest.approx(101470.156749)
    assert result.read.lat_p50_ns == 85504
    assert result.read.lat_p99_ns == 358400
    assert result.read.lat_p999_ns == 2244608
    assert result.write == IoStats(runtime_ms=0)
    assert result.iops == result.read.iops
    assert result.bw == result.read.bw_bytes
    assert result.lat_p99_ns == 358400
    assert result.errors == 0
    assert result.verify_ok is None
    assert [j.name for j in result.jobs] == ["rr"]
    assert result.jobs[0].options["rw"] == "randread"


def test_fio_2x_shape_matches_its_3x_source() -> None:
    """The hand-converted 2.x sample came from the 3.33 randread: same numbers, µs precision."""
    old = parse_fio_json(read("fio-2.x-shape-randread.HANDCONVERTED.json"))
    new = parse_fio_json(read("fio-3.33-randread.json"))
    assert old.fio_version == "fio-2.2.10"
    assert old.read.iops == new.read.iops
    assert old.read.bw_bytes == pytest.approx(new.read.bw_bytes, rel=1e-3)
    assert old.read.io_bytes == pytest.approx(new.read.io_bytes, rel=1e-3)
    assert old.read.lat_mean_ns == pytest.approx(new.read.lat_mean_ns, abs=1)
    assert old.read.lat_p99_ns == pytest.approx(new.read.lat_p99_ns, abs=1000)
    assert old.read.total_ios == pytest.approx(new.read.total_ios, rel=1e-2)
    assert old.jobs[0].options["ioengine"] == "libaio"  # from "global options"
    assert old.write.iops == 0


def test_two_jobs_are_aggregated() -> None:
    text = read("fio-3.33-randwrite-2jobs.json")
    raw = json.loads(text)
    w0, w1 = (job["write"] for job in raw["jobs"])
    result = parse_fio_json(text)
    assert len(result.jobs) == 2
    assert result.write.iops == pytest.approx(w0["iops"] + w1["iops"])
    assert result.write.bw_bytes == w0["bw_bytes"] + w1["bw_bytes"]
    assert result.write.io_bytes == w0["io_bytes"] + w1["io_bytes"]
    n0, n1 = w0["total_ios"], w1["total_ios"]
    expected_mean = (w0["lat_ns"]["mean"] * n0 + w1["lat_ns"]["mean"] * n1) / (n0 + n1)
    assert result.write.lat_mean_ns == pytest.approx(expected_mean)
    p0, p1 = (w["clat_ns"]["percentile"]["99.000000"] for w in (w0, w1))
    assert min(p0, p1) <= (result.write.lat_p99_ns or 0) <= max(p0, p1)
    assert result.read.iops == 0
    assert result.iops == result.write.iops


def test_lat_percentiles_preferred_when_present() -> None:
    text = read("fio-3.33-randrw-lat-percentiles.json")
    raw = json.loads(text)["jobs"][0]
    result = parse_fio_json(text)
    assert result.read.lat_p99_ns == raw["read"]["lat_ns"]["percentile"]["99.000000"]
    assert result.write.lat_p99_ns == raw["write"]["lat_ns"]["percentile"]["99.000000"]
    assert result.iops == pytest.approx(raw["read"]["iops"] + raw["write"]["iops"])
    assert result.lat_p99_ns == max(result.read.lat_p99_ns, result.write.lat_p99_ns)
    total = raw["read"]["total_ios"] + raw["write"]["total_ios"]
    mean = (
        raw["read"]["lat_ns"]["mean"] * raw["read"]["total_ios"]
        + raw["write"]["lat_ns"]["mean"] * raw["write"]["total_ios"]
    ) / total
    assert result.lat_mean_ns == pytest.approx(mean)


def test_sequential_bandwidth() -> None:
    result = parse_fio_json(read("fio-3.33-seqread-1m.json"))
    assert result.bw > 1024**3  # ~2 GB/s from the page cache-less scratch file
    assert result.read.iops == pytest.approx(result.bw / 1024**2, rel=0.01)


def test_clean_verify_is_ok() -> None:
    result = parse_fio_json(read("fio-3.33-write-verify-crc32c.json"))
    assert result.verify_ok is True
    assert result.errors == 0


def test_noise_before_json_is_skipped() -> None:
    text = read("fio-3.33-noise-prefixed.stdout")
    assert text.startswith("note: both iodepth")
    assert parse_fio_json(text).read.iops > 0


def test_noise_after_json_and_braces_in_noise() -> None:
    body = read("fio-3.33-randread.json")
    text = "{not json\n[   12.3] kernel: hello {x}\n" + body + "\nroot@guest:~# \n"
    assert parse_fio_json(text) == parse_fio_json(body)


def test_no_json_raises_with_output() -> None:
    with pytest.raises(WorkloadError, match="no fio JSON") as info:
        parse_fio_json("sh: fio: not found\n")
    assert "sh: fio: not found" in str(info.value)


def test_json_without_jobs_is_not_fio() -> None:
    with pytest.raises(WorkloadError, match="no fio JSON"):
        parse_fio_json('{"hello": 1}\n')


def test_failed_job_raises_with_fio_message() -> None:
    with pytest.raises(WorkloadError) as info:
        parse_fio_json(
            read("fio-3.33-failed-open.stdout"), stderr=read("fio-3.33-failed-open.stderr")
        )
    message = str(info.value)
    assert "fio job 'bad' failed: error 22 (Invalid argument)" in message
    assert "destination does not support O_DIRECT" in message
    assert "func=open(/tmp/fx/adir)" in message


def test_failed_job_non_strict_counts_errors() -> None:
    result = parse_fio_json(read("fio-3.33-failed-open.stdout"), strict=False)
    assert result.errors == 1
    assert result.verify_ok is None
    assert result.iops == 0


def test_verify_error_strict_names_verification() -> None:
    with pytest.raises(WorkloadError) as info:
        parse_fio_json(
            read("fio-3.33-verify-error.stdout"), stderr=read("fio-3.33-verify-error.stderr")
        )
    message = str(info.value)
    assert "data verification failed" in message
    assert "crc32c: verify failed at file" in message
    assert "Expected CRC" in message


@pytest.mark.parametrize("stem", ["fio-3.33-verify-error", "fio-3.33-verify-error-continue"])
def test_verify_error_non_strict(stem: str) -> None:
    result = parse_fio_json(read(f"{stem}.stdout"), stderr=read(f"{stem}.stderr"), strict=False)
    assert result.verify_ok is False
    assert result.errors == 1


def test_verify_failure_seen_only_on_stderr() -> None:
    """A verify job whose JSON is clean but whose stderr reports a mismatch is not ok."""
    result = parse_fio_json(
        read("fio-3.33-write-verify-crc32c.json"),
        stderr="verify: bad magic header 9000, wanted acca at file /dev/vdb offset 0",
        strict=False,
    )
    assert result.verify_ok is False


def test_result_dict_and_equality() -> None:
    text = read("fio-3.33-randrw-lat-percentiles.json")
    a, b = parse_fio_json(text), parse_fio_json(text)
    assert a == b
    assert "raw" not in repr(a)
    d = a.to_dict()
    json.dumps(d)
    assert d["iops"] == a.iops
    assert d["read"]["lat_p99_ns"] == a.read.lat_p99_ns
    assert d["jobs"][0]["name"] == "mix"
    assert a.raw["fio version"] == "fio-3.33"


def test_missing_percentiles_are_none() -> None:
    doc = json.loads(read("fio-3.33-randread.json"))
    del doc["jobs"][0]["read"]["clat_ns"]["percentile"]
    result = parse_fio_json(json.dumps(doc))
    assert result.read.lat_p99_ns is None
    assert result.lat_p99_ns is None
    assert result.read.lat_mean_ns > 0


def test_default_result_is_empty() -> None:
    empty = FioResult(read=IoStats(), write=IoStats())
    assert empty.iops == 0
    assert empty.lat_mean_ns == 0
    assert empty.lat_p99_ns is None


# --- check_fio_run --------------------------------------------------------------------


def test_check_ok() -> None:
    assert check_fio_run(0, read("fio-3.33-randread.json"), "").read.iops > 0


def test_check_nonzero_rc_without_json() -> None:
    with pytest.raises(WorkloadError) as info:
        check_fio_run(1, "", "fio: unrecognized option '--bogus'\n")
    assert "status 1 and printed no JSON" in str(info.value)
    assert "unrecognized option '--bogus'" in str(info.value)


def test_check_missing_fio() -> None:
    with pytest.raises(WorkloadError, match="127"):
        check_fio_run(127, "", "sh: 1: fio: not found")


def test_check_failed_job_carries_stderr() -> None:
    with pytest.raises(WorkloadError) as info:
        check_fio_run(1, read("fio-3.33-failed-open.stdout"), read("fio-3.33-failed-open.stderr"))
    assert "status 1" in str(info.value)
    assert "does not support O_DIRECT" in str(info.value)


def test_check_rc_nonzero_clean_json_strict_and_lenient() -> None:
    with pytest.raises(WorkloadError, match="status 2 although"):
        check_fio_run(2, read("fio-3.33-randread.json"), "boom")
    assert check_fio_run(2, read("fio-3.33-randread.json"), "boom", strict=False).iops > 0


def test_check_verify_continue_rc0_still_fails_strict() -> None:
    with pytest.raises(WorkloadError, match="verification"):
        check_fio_run(0, read("fio-3.33-verify-error-continue.stdout"))


def test_check_lenient_returns_verify_state() -> None:
    result = check_fio_run(
        1,
        read("fio-3.33-verify-error.stdout"),
        read("fio-3.33-verify-error.stderr"),
        strict=False,
    )
    assert result.verify_ok is False


@pytest.mark.parametrize(("runtime", "seconds"), [
    (5, 5.0), ("5", 5.0), ("5s", 5.0), ("500ms", 0.5), ("2m", 120.0), (None, 10.0)])
def test_runtime_seconds_is_the_one_reading_of_runtime(runtime: object, seconds: float) -> None:
    """guest.fio() budgets its timeout from this, the reading FioJob validated
    (it had a second parser of its own, which fell back to 10 s on any error)."""
    from pytest_virtio.workloads.fio import FioJob

    assert FioJob(filename="/dev/vdb", runtime=runtime).runtime_seconds == seconds  # type: ignore[arg-type]
