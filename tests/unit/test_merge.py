"""``python -m pytest_virtio.results merge``: shards judged together, machines kept apart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_virtio.results.__main__ import main
from pytest_virtio.results.records import Record, RelativeCheck, write_json

GROUP = "t.py::test_rr"


def shard(path: Path, machine: str, ide: float, virtio: float, checks: bool) -> Path:
    records = [
        Record(f"{GROUP}[disk=ide]", "ide", "randread", "tcg", machine, ide, 0.0,
               traps_per_io=26.0, group=GROUP),
        Record(f"{GROUP}[disk=virtio-blk]", "virtio-blk", "randread", "tcg", machine, virtio,
               0.0, traps_per_io=0.5, group=GROUP),
    ]
    check = RelativeCheck(f"{GROUP}[disk=virtio-blk]", GROUP, "virtio-blk", "randread", "tcg",
                          "ide", 1.2, "iops", machine)
    write_json(records, path, [check] if checks else [])
    return path


def test_merge_judges_each_machine_apart(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    a = shard(tmp_path / "a.json", "host-a", ide=1000, virtio=2000, checks=True)
    b = shard(tmp_path / "b.json", "host-b", ide=1000, virtio=900, checks=True)
    out = tmp_path / "all.json"
    chart = tmp_path / "chart.svg"
    assert main(["merge", str(a), str(b), "--json", str(out), "--plot", str(chart)]) == 1
    text = capsys.readouterr().out
    assert "machines: host-a, host-b" in text
    assert "ok           virtio-blk vs ide (randread, iops, tcg): 2.00x, required 1.2x" in text
    assert "FAILED       virtio-blk vs ide (randread, iops, tcg): 0.90x, required 1.2x" in text
    merged = json.loads(out.read_text())
    assert len(merged["records"]) == 4 and len(merged["checks"]) == 2
    assert "randread (tcg, host-b)" in chart.read_text()


def test_merge_a_check_finds_its_reference_in_another_shard(tmp_path: Path) -> None:
    # The IDE item ran on one CI runner, the virtio-blk item on another of the same host.
    a = shard(tmp_path / "a.json", "host", ide=1000, virtio=5000, checks=False)
    b = shard(tmp_path / "b.json", "host", ide=1000, virtio=5000, checks=True)
    data = json.loads(a.read_text())
    data["records"] = [r for r in data["records"] if r["device"] == "ide"]
    a.write_text(json.dumps(data))
    data = json.loads(b.read_text())
    data["records"] = [r for r in data["records"] if r["device"] != "ide"]
    b.write_text(json.dumps(data))
    assert main(["merge", str(a), str(b)]) == 0


def test_merge_reads_version_1_shards_that_carried_the_group_in_extra(tmp_path: Path) -> None:
    """A shard written before group/pair/role/cpu_starved were record fields is judged
    as before: its records still find their group (and the check its reference)."""
    old = shard(tmp_path / "old.json", "host", ide=1000, virtio=900, checks=True)
    data = json.loads(old.read_text())
    data["version"] = 1
    for record in data["records"]:
        for key in ("group", "pair", "role", "cpu_starved"):
            value = record.pop(key)
            if value not in (None, "measured"):
                record["extra"][key] = value
    old.write_text(json.dumps(data))
    assert main(["merge", str(old)]) == 1  # 0.90x < 1.2x: FAILED, not "no result for ide"


def test_merge_bad_input_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "pytest_virtio.results", "merge", str(bad)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "bad.json" in proc.stderr and "not valid JSON" in proc.stderr
