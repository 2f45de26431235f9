"""Crash consistency: every disk a power cut could have left, checked in a guest.

The disk is served by the in-process vhost-user-blk backend with a write log
(`write_log: True`): it records every write and flush the guest's filesystem
sent.  After the workload, the `crash_check` fixture builds the images a power
cut could have left (virtio 1.2 §5.2.6.2: only writes before a completed flush
are sure to be on the disk), mounts each in a checker guest, runs `e2fsck -fn`
and the application's own invariant.

The application here replaces a file by writing a new one and renaming it over
the old one.  Its invariant: after any crash, `target` holds the whole old or
the whole new content.

Run with `make demo`, or `pytest examples/test_crash_consistency.py`.
"""

import hashlib
import subprocess

import pytest

from pytest_virtio import CrashCheckFailed

SIZE = 16384
OLD, NEW = b"old\n" * (SIZE // 4), b"new\n" * (SIZE // 4)
#: The application's invariant, as a shell check on the state's mounted filesystem.
WHOLE_OLD_OR_WHOLE_NEW = (
    f'case "$(md5sum < "$MNT/target")" in '
    f"{hashlib.md5(OLD).hexdigest()}*|{hashlib.md5(NEW).hexdigest()}*) exit 0;; esac; exit 1"
)


@pytest.fixture
def data_disk(tmp_path):
    """An ext4 image whose /target holds the old content, made on the host."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "target").write_bytes(OLD)
    image = tmp_path / "data.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tmp_path / "root"), str(image), "32M"],
                   check=True)
    return {"name": "data", "bus": "vhost-user-blk", "image": str(image), "write_log": True}


def replace_target(guest, mount_options, fsync_new_file):
    """The application: write target.tmp, (fsync it,) rename it over target, fsync the dir."""
    dev = guest.disk_path("data")
    fsync = "sync /mnt/target.tmp && " if fsync_new_file else ""
    guest.check(f"mount -o {mount_options} {dev} /mnt && "
                f"yes new | head -c {SIZE} > /mnt/target.tmp && {fsync}"
                "mv /mnt/target.tmp /mnt/target && sync /mnt && umount /mnt")


def test_write_fsync_rename_fsync_survives_every_power_cut(make_guest, data_disk, crash_check):
    """The correct pattern: every flush boundary and 8 sampled states hold the invariant."""
    guest = make_guest(disks=[data_disk])
    replace_target(guest, "defaults", fsync_new_file=True)
    report = crash_check(guest.logged_disk("data"), check=WHOLE_OLD_OR_WHOLE_NEW, subsets=8)
    assert report.failed == 0 and report.checked >= 3


def test_rename_without_fsync_is_caught(make_guest, data_disk, crash_check):
    """Rename over the file without fsync of its data: a power cut can leave it empty
    (ext4 `noauto_da_alloc` turns off the heuristic that hides this bug)."""
    guest = make_guest(disks=[data_disk])
    replace_target(guest, "noauto_da_alloc", fsync_new_file=False)
    with pytest.raises(CrashCheckFailed, match="check failed") as failure:
        crash_check(guest.logged_disk("data"), check=WHOLE_OLD_OR_WHOLE_NEW, fail_fast=True)
    # The message names the state (the power cut, which writes were lost), the kept
    # image and the reproduce.sh that boots a guest on it.
    assert "flush-boundary: power cut after request" in str(failure.value)
    assert "reproduce.sh" in str(failure.value)
