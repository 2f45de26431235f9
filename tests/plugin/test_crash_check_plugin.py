"""The ``crash_check`` fixture end to end (issue 28 item 4): the demo's example file run as
a user runs it, its counts in the terminal summary and ``--virtio-json``, the first bad
state's image and ``reproduce.sh`` kept, nothing kept for a passing check.

The example (examples/test_crash_consistency.py) replaces a file by rename on a
logged ext4 disk twice: the correct way (write, fsync, rename, fsync the
directory) passes every state; without the file's fsync (ext4
``noauto_da_alloc``) a flush boundary leaves it empty and the check fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_virtio.plugin.artifacts import dir_name

EXAMPLE = Path(__file__).parents[2] / "examples" / "test_crash_consistency.py"
GOOD = "test_crash_consistency.py::test_write_fsync_rename_fsync_survives_every_power_cut"
BAD = "test_crash_consistency.py::test_rename_without_fsync_is_caught"


def test_counts_reach_summary_and_json_and_the_bad_state_is_kept(
        pytester: pytest.Pytester, inner_tmp: Path, find_qemus, run_reproducer,
        tmp_path: Path) -> None:
    pytester.makepyfile(test_crash_consistency=EXAMPLE.read_text())
    result = pytester.runpytest_subprocess("--virtio-accel=tcg", "--virtio-json=out.json")
    result.assert_outcomes(passed=2)
    counts = {c["test_id"]: c for c in json.loads((pytester.path / "out.json").read_text())
              ["crash"]}
    good, bad = counts[GOOD], counts[BAD]
    total = (f"crash states: {good['generated'] + bad['generated']} generated, "
             f"{good['checked'] + bad['checked']} checked, 1 failed in 2 check(s)")
    result.stdout.fnmatch_lines(["*pytest-virtio results*", total,
                                 f"{BAD} disk 'data': * 1 failed (seed 0, *",
                                 "    first failure: state * (flush-boundary: power cut*"])

    assert good["failed"] == 0 and good["checked"] == good["generated"] >= 3
    assert good["kept_image"] is None and good["reproducer"] is None
    kept = pytester.path / ".pytest-virtio"
    assert not (kept / dir_name(GOOD)).exists()  # a passing check keeps nothing

    assert bad["failed"] == 1 and bad["checked"] <= bad["generated"]  # fail_fast
    image, reproducer = Path(bad["kept_image"]), Path(bad["reproducer"])
    assert image.parent == kept / dir_name(BAD) / "crash-states" / "data"
    assert image.stat().st_size == 32 * 1024 * 1024
    assert 'qemu-img create -q -f qcow2 -F raw -b "$here/' in reproducer.read_text()
    assert (image.parent / f"{image.stem}-boot.sh").is_file()
    assert find_qemus(inner_tmp) == []
    # The kept state boots after the session, as its disk "crash" (an overlay over it).
    before = image.read_bytes()
    qemu = run_reproducer(reproducer, tmp_path / "repro")
    assert f"{tmp_path / 'repro' / 'crash.qcow2'}" in qemu
    assert image.read_bytes() == before  # the kept image is never written
    assert find_qemus(tmp_path / "repro") == []
