#!/usr/bin/env python3
"""Crash states checked per minute (issue 28 target: >= 50 states in <= 3 min under TCG).

A guest runs a workload on a logged ext4 disk (``Disk(write_log=True)``) that
leaves many flush boundaries: ``--files`` small files, each written and fsynced
(every fsync commits ext4's journal: a flush).  Then ``check_crash_states``
checks every flush boundary, the final state and ``--subsets`` sampled subsets
in one reused checker guest: journal replay by mount, ``e2fsck -fn``, and the
application's invariant (every file present is whole: fsync'ed files are never
torn).  Printed: states generated, checked and failed, the wall time split
(checker guest, images, guest-side checks) and states per minute.

The peer, measured in the same run: a fresh guest per state (what checking a
crash image costs without a reused checker), i.e. a boot of the same checker
shape plus that state's check, from ``--boots`` boots.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pytest_virtio.guests.crashcheck import check_crash_states
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.guests.settings import Settings
from pytest_virtio.spec import Disk, MachineSpec

#: Bytes per file: one ext4 block, so a file is whole or empty, never half.
FILE_SIZE = 4096

#: Every file on the crash image is empty (its fsync never returned) or whole.
INVARIANT = (f'for f in "$MNT"/f*; do [ -e "$f" ] || continue; s=$(wc -c < "$f"); '
             f'[ "$s" -eq 0 ] || [ "$s" -eq {FILE_SIZE} ] || {{ echo "$f: $s bytes"; exit 1; }}; '
             'done')


def _ext4(tmp: Path) -> Path:
    image = tmp / "data.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E",
                    "lazy_itable_init=0,lazy_journal_init=0", str(image), "32M"], check=True)
    return image


def _workload(files: int) -> str:
    return ("mkdir -p /mnt/d && mount -t ext4 /dev/$DEV /mnt/d && "
            f"for i in $(seq 1 {files}); do head -c {FILE_SIZE} /dev/urandom > /mnt/d/f$i && "
            "sync /mnt/d/f$i; done && umount /mnt/d")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20, help="files written and fsynced")
    parser.add_argument("--subsets", type=int, default=24, help="sampled subset states")
    parser.add_argument("--boots", type=int, default=3, help="boots for the peer's figure")
    parser.add_argument("--accel", default="auto")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    settings = Settings.from_values({"accel": args.accel})
    with tempfile.TemporaryDirectory(prefix="pv-crash-bench-") as tmp, \
            VirtioSession(settings) as session:
        tmp_path = Path(tmp)
        choice = session.accel()
        print(f"accel: {choice.accel} ({choice.note}); host load {os.getloadavg()[0]:.1f}")
        spec = MachineSpec(disks=(Disk(name="data", image=str(_ext4(tmp_path)),
                                       write_log=True),))
        guest = session.boot(spec, "workload")
        try:
            dev = guest.disk_path("data").removeprefix("/dev/")
            start = time.monotonic()
            guest.check(_workload(args.files).replace("$DEV", dev),
                        timeout=guest.default_timeout() * 2)
            print(f"workload: {args.files} files written and fsynced in "
                  f"{time.monotonic() - start:.1f} s")
            logged = guest.logged_disk("data")
        finally:
            guest.close()
            session.guests.remove(guest)
        report = check_crash_states(session, logged, tmp_path / "states", subsets=args.subsets,
                                    seed=args.seed, check=INVARIANT)
        print(report.summary())
        per_state = report.timings.check / max(1, report.checked)
        print(f"{report.checked} states in {report.timings.total:.1f} s: "
              f"{report.states_per_minute:.1f} states/min ({per_state:.2f} s of checks "
              "per state)")
        target = report.checked >= 50 and report.timings.total <= 180
        print(f"target (>= 50 states in <= 180 s): {'met' if target else 'MISSED'}")
        boots = []
        for i in range(args.boots):
            start = time.monotonic()
            peer = session.boot(MachineSpec(disks=(Disk(name="crash", size="32M"),)), f"p{i}")
            boots.append(time.monotonic() - start)
            peer.close()
            session.guests.remove(peer)
        boot = statistics.median(boots)
        print(f"peer, a fresh guest per state: boot median {boot:.2f} s (n={len(boots)}) + "
              f"{per_state:.2f} s check = {boot + per_state:.2f} s per state; the reused "
              f"checker: {report.timings.total / max(1, report.checked):.2f} s per state, "
              f"{(boot + per_state) / (report.timings.total / max(1, report.checked)):.1f}x "
              "faster")


if __name__ == "__main__":
    main()
