"""The crash-consistency oracle on real guests (issue 28 items 3-4).

One workload guest has two logged ext4 disks, made on the host with a file
``target`` holding the old content.  On ``safe`` (ext4 defaults) it replaces
the file the correct way: write a temp file, fsync it, rename it over the
target, fsync the directory.  On ``fragile`` (``noauto_da_alloc``, so ext4 does
not quietly write the data before the rename commits) it skips the file's
fsync.  The application's invariant: the target holds the whole old or the
whole new content.

The fragile run is caught deterministically: the directory's fsync commits the
rename (a flush) while the temp file's data is still delayed-allocated in the
page cache, so the flush boundary right after that commit has a zero-length
target; every flush boundary is checked, whatever the seed.  The safe run
passes every state, boundaries and the sampled subsets.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from pytest_virtio.guests.crashcheck import check_crash_states
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.spec import Disk, MachineSpec
from pytest_virtio.vhost_user.crashstates import Durability, StateKind
from pytest_virtio.vhost_user.writelog import RecordKind

SIZE = 16384
OLD, NEW = b"old\n" * (SIZE // 4), b"new\n" * (SIZE // 4)


def _ext4_with_target(tmp: Path, name: str) -> Path:
    """A 32 MiB ext4 image whose /target holds OLD (mkfs -d: no mount needed)."""
    src = tmp / f"{name}-root"
    src.mkdir()
    (src / "target").write_bytes(OLD)
    image = tmp / f"{name}.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E",
                    "lazy_itable_init=0,lazy_journal_init=0", "-d", str(src), str(image), "32M"],
                   check=True)
    return image


def _replace(guest: Guest, name: str, options: str, fsync_file: bool) -> None:
    """Mount disk ``name``, replace /target with NEW, then sync and unmount."""
    dev, mnt = guest.disk_path(name), f"/mnt/{name}"
    file_sync = f"sync {mnt}/target.tmp && " if fsync_file else ""
    guest.check(f"mkdir -p {mnt} && mount -t ext4 -o {options} {dev} {mnt} && "
                f"yes new | head -c {SIZE} > {mnt}/target.tmp && {file_sync}"
                f"mv {mnt}/target.tmp {mnt}/target && sync {mnt} && sync && umount {mnt}")


def _invariant() -> str:
    """Shell: $MNT/target is the whole old or the whole new content."""
    old, new = hashlib.md5(OLD).hexdigest(), hashlib.md5(NEW).hexdigest()
    return (f'case "$(md5sum < "$MNT/target")" in {old}*|{new}*) exit 0;; esac; '
            'ls -l "$MNT"; exit 1')


def test_crash_states_catch_rename_without_fsync_and_pass_the_correct_pattern(
        virtio_session: VirtioSession, tmp_path: Path) -> None:
    safe_img, fragile_img = _ext4_with_target(tmp_path, "safe"), _ext4_with_target(
        tmp_path, "fragile")
    spec = MachineSpec(disks=(Disk(name="safe", image=str(safe_img), write_log=True),
                              Disk(name="fragile", image=str(fragile_img), write_log=True)))
    before = safe_img.read_bytes()
    guest = virtio_session.boot(spec, "crash-workload")
    try:
        _replace(guest, "safe", "defaults", fsync_file=True)
        _replace(guest, "fragile", "noauto_da_alloc", fsync_file=False)
        safe, fragile = guest.logged_disk("safe"), guest.logged_disk("fragile")
    finally:
        guest.close()
        virtio_session.guests.remove(guest)
    assert safe.durability is Durability.WRITE_BACK  # Linux negotiated FLUSH with writeback
    assert any(r.kind is RecordKind.FLUSH for r in fragile.log.records)
    assert safe.base.read_bytes() == before != safe_img.read_bytes()  # the disk before boot

    bad = check_crash_states(virtio_session, fragile, tmp_path / "fragile-states", subsets=0,
                             check=_invariant(), fail_fast=True)
    print(bad.summary())
    first = bad.first_failure
    assert first is not None, bad.summary()
    assert first.phase == "check" and first.state.kind is StateKind.FLUSH_BOUNDARY
    assert "dropped" in first.describe()
    assert bad.kept_image is not None and bad.kept_image.exists()
    assert bad.reproducer is not None and "qemu-img create" in bad.reproducer.read_text()
    assert (bad.kept_image.parent / f"{bad.kept_image.stem}-boot.sh").exists()

    good = check_crash_states(virtio_session, safe, tmp_path / "safe-states", subsets=4,
                              seed=7, check=_invariant())
    print(good.summary(), f"{good.states_per_minute:.1f} states/min")
    assert good.failed == 0, good.summary()
    assert good.checked == good.generated >= 3
    assert good.kept_image is None and not list((tmp_path / "safe-states").glob("*.img"))
