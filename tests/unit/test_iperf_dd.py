"""dd and iperf3: command builders and parsers against recorded real output."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from pytest_virtio.errors import ConfigError, WorkloadError
from pytest_virtio.workloads.dd import DdResult, check_dd_run, dd_shell, parse_dd
from pytest_virtio.workloads.iperf import NetResult, iperf3_client_shell, parse_iperf3_json

DATA = Path(__file__).parent / "data"


def read(name: str) -> str:
    """Bytes decoded as-is: dd's progress lines end in a bare CR we must keep."""
    return (DATA / name).read_bytes().decode()


# --- dd -------------------------------------------------------------------------------


def test_dd_shell_golden() -> None:
    line = dd_shell("/dev/zero", "/dev/vdb", bs="1M", count=64, oflag="direct")
    assert line == "dd if=/dev/zero of=/dev/vdb bs=1048576 count=64 oflag=direct"


def test_dd_shell_quotes_paths() -> None:
    line = dd_shell("/dev/vdb", "/mnt/a b", iflag="direct,fullblock", conv="fsync")
    assert shlex.split(line) == [
        "dd",
        "if=/dev/vdb",
        "of=/mnt/a b",
        "bs=1048576",
        "iflag=direct,fullblock",
        "conv=fsync",
    ]


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"bs": "1Q"}, "'1Q'"),
        ({"bs": 0}, "bs=0"),
        ({"count": 0}, "count=0"),
        ({"oflag": "direct; reboot"}, "oflag='direct; reboot'"),
    ],
)
def test_dd_shell_rejects(kwargs: dict[str, object], word: str) -> None:
    with pytest.raises(ConfigError) as info:
        dd_shell("/dev/zero", "/dev/null", **kwargs)  # type: ignore[arg-type]
    assert word in str(info.value)


def test_parse_gnu_dd() -> None:
    result = parse_dd(read("dd/gnu-coreutils-9.1-64M.stderr"))
    assert result == DdResult(67108864, 0.0420395, pytest.approx(67108864 / 0.0420395))


def test_parse_gnu_dd_tiny_copy_scientific_time() -> None:
    result = parse_dd(read("dd/gnu-coreutils-9.1-1B-sci-time.stderr"))
    assert result.bytes == 1
    assert result.seconds == pytest.approx(2.8385e-05)
    assert result.bw == pytest.approx(1 / 2.8385e-05)


def test_parse_gnu_dd_progress_takes_final_line() -> None:
    text = read("dd/gnu-coreutils-9.1-progress.stderr")
    assert "\r" in text
    result = parse_dd(text)
    assert result.bytes == 3072000000
    assert result.seconds == pytest.approx(1.37393)


@pytest.mark.parametrize(
    "line",
    [
        "67108864 bytes (67 MB) copied, 0,5 s, 134 MB/s",  # old coreutils, comma locale
        "67108864 bytes (64.0MB) copied, 0.5 seconds, 128.0MB/s",
    ],
)
def test_parse_dd_variants(line: str) -> None:
    result = parse_dd(f"64+0 records in\n64+0 records out\n{line}\n")
    assert (result.bytes, result.seconds) == (67108864, 0.5)
    assert result.bw == 67108864 / 0.5


def test_parse_busybox_status_line() -> None:
    result = parse_dd(read("dd/busybox-status-line.HANDWRITTEN.stderr"))
    assert result.bytes == 67108864
    assert result.seconds == pytest.approx(0.051245)


def test_busybox_without_status_line_explains() -> None:
    with pytest.raises(WorkloadError, match="FEATURE_DD_THIRD_STATUS_LINE"):
        parse_dd(read("dd/busybox-1.35-debian-no-status-line.stderr"))


def test_zero_seconds_gives_zero_bw() -> None:
    assert parse_dd("0 bytes copied, 0 s, 0 B/s").bw == 0.0


def test_check_dd_run() -> None:
    assert check_dd_run(0, read("dd/gnu-coreutils-9.1-64M.stderr")).bytes == 67108864
    with pytest.raises(WorkloadError) as info:
        check_dd_run(1, read("dd/gnu-coreutils-9.1-failed-open.stderr"))
    assert "status 1" in str(info.value)
    assert "failed to open '/nonexistent'" in str(info.value)


# --- iperf3 ---------------------------------------------------------------------------


def test_iperf3_shell() -> None:
    assert iperf3_client_shell("10.0.2.2", 5201, 5) == "iperf3 -c 10.0.2.2 -p 5201 -t 5 -J"
    assert iperf3_client_shell("10.0.2.2", 5201, 0.5, reverse=True).endswith("-t 0.5 -J -R")


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"host": "a;b"}, "host='a;b'"),
        ({"port": 0}, "port=0"),
        ({"port": 70000}, "port=70000"),
        ({"seconds": 0}, "seconds=0"),
        ({"seconds": float("inf")}, "seconds=inf"),
    ],
)
def test_iperf3_shell_rejects(kwargs: dict[str, object], word: str) -> None:
    args: dict[str, object] = {"host": "10.0.2.2", **kwargs}
    with pytest.raises(ConfigError) as info:
        iperf3_client_shell(**args)  # type: ignore[arg-type]
    assert word in str(info.value)


@pytest.mark.parametrize("name", ["iperf3-forward.json", "iperf3-reverse.json"])
def test_parse_iperf3_uses_receiver(name: str) -> None:
    text = read(f"iperf3/{name}")
    end = json.loads(text)["end"]
    result = parse_iperf3_json(text)
    assert result == NetResult(
        bits_per_second=end["sum_received"]["bits_per_second"],
        bytes=end["sum_received"]["bytes"],
        seconds=end["sum_received"]["seconds"],
        retransmits=end["sum_sent"]["retransmits"],
    )
    assert result.bits_per_second > 1e9  # loopback


def test_parse_iperf3_error() -> None:
    with pytest.raises(WorkloadError, match="Connection refused"):
        parse_iperf3_json(read("iperf3/iperf3-refused.json"))


def test_parse_iperf3_noise_and_udp_shape() -> None:
    doc = {
        "start": {},
        "end": {"sum": {"seconds": 1.0, "bytes": 125000, "bits_per_second": 1e6}},
    }
    result = parse_iperf3_json("Connecting...\n" + json.dumps(doc) + "\n# ")
    assert result == NetResult(1e6, 125000, 1.0, None)


@pytest.mark.parametrize("text", ["", "iperf3: command not found", '{"end": {}}'])
def test_parse_iperf3_garbage(text: str) -> None:
    with pytest.raises(WorkloadError):
        parse_iperf3_json(text)
