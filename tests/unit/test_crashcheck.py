"""Logged disks and the crash-state checker without QEMU: the Disk key, the logged
backend launch starts (a real server, a real log), the checker's guest-side steps,
its reproducer (run by the host's sh and qemu-img) and its report."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pytest_virtio.errors import ConfigError
from pytest_virtio.guests import launch, writelogs
from pytest_virtio.guests.crashcheck import (
    CrashCheckFailed,
    CrashReport,
    StateVerdict,
    Timings,
    check_crash_states,
    guest_steps,
    reproducer_wrapper,
)
from pytest_virtio.spec import Disk
from pytest_virtio.spec.parse import disk_from
from pytest_virtio.vhost_user.crashstates import CrashState, Durability, StateKind
from pytest_virtio.vhost_user.writelog import LoggedStorage, RecordKind

SIZE = 1 << 20


def test_write_log_is_refused_where_no_in_process_backend_serves_the_disk() -> None:
    with pytest.raises(ConfigError, match=r"write_log= .*only applies to bus 'vhost-user-blk'"):
        Disk(name="d", bus="virtio-blk", write_log=True)
    with pytest.raises(ConfigError, match="external_socket= cannot be logged"):
        Disk(name="d", external_socket="/tmp/x.sock", write_log=True)
    with pytest.raises(ConfigError, match="write_log must be True or False"):
        Disk(name="d", write_log="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="write_log"):  # the marker's dict form, at collection
        disk_from({"bus": "nvme", "write_log": True}, "vm(disks=[0])", "disk0")
    assert disk_from({"write_log": True}, "vm(disks=[0])", "disk0").write_log is True


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "user.img"
    with path.open("wb") as f:  # sparse: one block of data
        f.truncate(SIZE)
        f.seek(4096)
        f.write(b"before")
    return path


def test_a_logged_backend_keeps_the_base_and_logs_every_write(tmp_path: Path,
                                                                image: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    disk = Disk(name="data", image=str(image), write_log=True)
    server = launch.start_backend(disk, str(image), run_dir, 1)
    try:
        assert isinstance(server.storage, LoggedStorage)
        server.storage.writev(4096, [memoryview(b"after!".ljust(512, b"\0"))])
        server.storage.flush()
        logged = writelogs.logged_disk({"data": server}, run_dir, "data", "guest")
    finally:
        server.close()
    assert [r.kind for r in logged.log.records] == [RecordKind.WRITE, RecordKind.FLUSH]
    assert logged.log.data(logged.log.records[0]) == b"after!".ljust(512, b"\0")
    assert logged.base == writelogs.base_path(run_dir, "data")
    assert logged.base.read_bytes()[4096:4102] == b"before"  # the disk before it was served
    assert image.read_bytes()[4096:4102] == b"after!"
    assert os.stat(logged.base).st_blocks * 512 < SIZE  # a sparse copy
    # Nothing negotiated (no front-end): virtio 1.2 §5.2.6.2 case (1), write-through.
    assert logged.durability is Durability.WRITE_THROUGH
    with pytest.raises(ConfigError, match="exists already"):
        launch.start_backend(disk, str(image), run_dir, 1)


def test_logged_disk_names_the_key_for_a_disk_without_a_log(tmp_path: Path,
                                                             image: Path) -> None:
    server = launch.start_backend(Disk(name="plain", image=str(image)), str(image), tmp_path, 1)
    try:
        with pytest.raises(ConfigError, match=r"logged_disk\('plain'\).*write_log=True"):
            writelogs.logged_disk({"plain": server}, tmp_path, "plain", "guest")
    finally:
        server.close()


def test_guest_steps_mount_fsck_then_the_tests_check() -> None:
    steps = guest_steps("ext4", "/dev/vdb", "test -s $MNT/f")
    assert [p for p, _ in steps] == ["mount", "fsck", "mount read-only", "check"]
    assert steps[1][1] == "e2fsck -fn /dev/vdb"
    assert "mount -t ext4 -o ro /dev/vdb /mnt/pv-crash" in steps[2][1]
    assert steps[3][1].endswith("export DEV MNT; test -s $MNT/f")
    assert guest_steps(None, "/dev/vdb", "true") == [
        ("check", "DEV=/dev/vdb MNT=/mnt/pv-crash; export DEV MNT; true")]
    # The host's sh runs the check step with $DEV set:
    out = subprocess.run(["sh", "-c", guest_steps(None, "/dev/x y", 'echo "$DEV"')[0][1]],
                         capture_output=True, text=True, check=True).stdout
    assert out == "/dev/x y\n"


class _NoGuests:
    guests: list[object] = []

    def boot(self, *args: object, **kwargs: object) -> object:
        raise AssertionError("no guest should be booted for a refused call")

    def image_for(self, spec: object) -> object:
        raise AssertionError("not reached")


def test_check_crash_states_refuses_unknown_fs_and_nothing_to_check(tmp_path: Path,
                                                                     image: Path) -> None:
    server = launch.start_backend(Disk(name="d", image=str(image), write_log=True),
                                  str(image), tmp_path, 1)
    try:
        logged = writelogs.logged_disk({"d": server}, tmp_path, "d", "guest")
    finally:
        server.close()
    host = _NoGuests()
    with pytest.raises(ConfigError, match=r"fs='zfs'.*choose one of ext2, ext3, ext4"):
        check_crash_states(host, logged, tmp_path / "o", fs="zfs")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="would check nothing"):
        check_crash_states(host, logged, tmp_path / "o", fs=None)  # type: ignore[arg-type]


def test_reproducer_makes_an_overlay_over_the_kept_image_and_runs_the_boot(
        tmp_path: Path) -> None:
    kept = tmp_path / "state-003.img"
    kept.write_bytes(b"\x00" * SIZE)
    boot = tmp_path / "state-003-boot.sh"
    boot.write_text('echo "boot in $PV_RUN with $*"\n')
    script = tmp_path / "reproduce.sh"
    script.write_text(reproducer_wrapper(kept, boot, "flush-boundary: cut after 7"))
    run = tmp_path / "r" / "new"  # a PV_RUN that does not exist yet is made
    res = subprocess.run(["sh", str(script), "-serial", "stdio"], capture_output=True,
                         text=True, env={**os.environ, "PV_RUN": str(run)}, check=True)
    assert res.stdout == f"boot in {run} with -serial stdio\n"
    info = subprocess.run(["qemu-img", "info", "--output=json", str(run / "crash.qcow2")],
                          capture_output=True, text=True, check=True).stdout
    assert f'"backing-filename": "{kept}"' in info
    assert kept.read_bytes() == b"\x00" * SIZE


def _verdict(index: int, phase: str) -> StateVerdict:
    state = CrashState(StateKind.FLUSH_BOUNDARY, 7, 3, (1, 2, 4), (5,))
    return StateVerdict(index, state, phase, "line1\nexit 1: target empty\n")


def test_report_counts_and_names_the_first_failure(tmp_path: Path) -> None:
    timings = Timings(guest=6.0, materialize=1.0, check=22.0, close=1.0)
    ok = CrashReport("d", 7, 12, (_verdict(0, ""), _verdict(1, "check"), _verdict(2, "fsck")),
                     tmp_path, tmp_path / "state-001.img", tmp_path / "reproduce.sh", timings)
    assert (ok.checked, ok.failed, ok.generated) == (3, 2, 12)
    assert ok.first_failure is not None and ok.first_failure.index == 1
    assert ok.states_per_minute == pytest.approx(6.0)
    text = ok.summary()
    assert "12 crash state(s) generated (seed 7), 3 checked, 2 failed in 30.0s" in text
    assert "state 1 (flush-boundary: power cut after request 7" in text
    assert "dropped: 5): check failed: line1 | exit 1: target empty" in text
    assert "reproduce.sh" in text
    with pytest.raises(CrashCheckFailed, match="2 failed"):
        ok.raise_on_failure()
    clean = CrashReport("d", 7, 1, (_verdict(0, ""),), tmp_path, None, None, timings)
    clean.raise_on_failure()
    assert "first failure" not in clean.summary()
