"""xdist with more guests than workers: 6 guest tests on 3 workers, no collisions, one
summary.

One inner run (6 boots) on purpose: it is the most expensive test of the plugin
suite, and everything worth asserting about parallel guests is visible in it —
per-worker run directories, distinct QEMUs, artifacts kept per test without
clobbering each other (``--virtio-keep=always``, dmesg included), and the
controller's summary counting every worker's results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TCG = "--virtio-accel=tcg"
N_TESTS = 6

INNER = f"""
import json, os
import pytest

@pytest.mark.parametrize("i", range({N_TESTS}))
def test_guest(guest, i, worker_id, virtio_session):
    res = guest.check("cat /proc/sys/kernel/random/boot_id")
    record = dict(i=i, worker=worker_id, pid=guest.machine.pid,
                  run_dir=str(guest.run_dir), root=str(virtio_session.run_root),
                  boot_id=res.stdout.strip(), sock=guest.machine.qmp_socket)
    with open(os.path.join(@OUT@, f"rec-{{i}}.json"), "w") as f:
        json.dump(record, f)
"""


def test_six_guests_on_three_workers_do_not_collide(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus
) -> None:
    out = pytester.mkdir("records")
    pytester.makepyfile(INNER.replace("@OUT@", repr(str(out))))
    result = pytester.runpytest_subprocess(TCG, "-n", "3", "--virtio-keep=always")
    result.assert_outcomes(passed=N_TESTS)
    # The controller's summary line covers every worker's tests.
    result.stdout.fnmatch_lines([f"*{N_TESTS} passed*"])
    records = [json.loads(p.read_text()) for p in sorted(out.glob("rec-*.json"))]
    assert len(records) == N_TESTS
    assert len({r["worker"] for r in records}) > 1, "xdist ran everything on one worker"
    # Nothing shared between guests: QEMU, run directory, sockets, guest boot.
    for key in ("pid", "run_dir", "sock", "boot_id"):
        assert len({r[key] for r in records}) == N_TESTS, f"{key} collided: {records}"
    # One run root per worker process, each a short path under the private TMPDIR.
    roots = {r["worker"]: r["root"] for r in records}
    assert len(set(roots.values())) == len(roots)
    assert all(Path(root).parent == inner_tmp for root in roots.values())
    # Every worker cleaned up: no QEMU, no socket left behind (keep=always keeps
    # the run directories themselves, so look inside them).
    assert find_qemus(inner_tmp) == []
    assert len([p for p in inner_tmp.iterdir() if p.name.startswith("pv-")]) == len(roots)
    assert list(inner_tmp.rglob("*.sock")) == []
    # keep=always: each test's guest kept its own artifacts, dmesg included.
    kept = sorted((pytester.path / ".pytest-virtio").glob("*/guest"))
    assert len(kept) == N_TESTS, kept
    for d in kept:
        for name in ("console.log", "qemu.stderr", "qmp-events.json", "reproduce.sh"):
            assert (d / name).is_file(), f"{d} lacks {name}"
        assert "Linux version" in (d / "dmesg.txt").read_text()
        assert json.loads((d / "qmp-events.json").read_text())[0]["event"] == "RESUME"
