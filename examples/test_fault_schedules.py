"""Fault schedules that search themselves: does a guest program keep its word under I/O errors?

The in-process vhost-user-blk backend can fail any chosen request.  `search_faults`
draws schedules of up to two faults (seeded, with Hypothesis) and shrinks a
schedule that breaks the program's promise to a minimal one, printed so it can be
replayed exactly.  The program here retries each write once but ignores the
retry's status: it survives any single error, and the search finds the two-fault
schedule that makes it say OK while the data is lost.

Run with `make demo`, or `pytest examples/test_fault_schedules.py`.
"""

import itertools
from pathlib import Path

import pytest

from pytest_virtio import FaultScheduleFailed, armed, search_faults

# w I: write block I (4 KiB, O_DIRECT: one write request); the writer retries once
# but ignores the retry's status, then says OK.
WRITER = ("w() {{ printf '%4096s' \"run {n} block $1\" | "
          "dd of={dev} bs=4096 seek=$1 oflag=direct iflag=fullblock 2>/dev/null; }}; "
          "for i in 0 1 2; do w $i || w $i; done; echo OK")


@pytest.mark.vm(disks=[{"name": "data", "bus": "vhost-user-blk", "size": "4M"}])
def test_the_writer_keeps_its_word_under_two_io_errors(guest, vhost):
    disk, dev, runs = vhost["data"], guest.disk_path("data"), itertools.count()

    def trial(schedule):              # one run of the program under one schedule
        n = next(runs)                # each run writes its own content
        with armed(disk.faults, schedule):
            said = guest.check(WRITER.format(n=n, dev=dev)).stdout.strip()
        if said == "OK":              # the property: OK means the data is on the disk
            want = b"".join(f"run {n} block {i}".rjust(4096).encode() for i in range(3))
            assert Path(disk.storage.path).read_bytes()[:3 * 4096] == want, "said OK, lost data"

    report = search_faults(trial, types=("write",), max_faults=2, max_ordinal=4,
                           examples=12, seed=0)
    with pytest.raises(FaultScheduleFailed, match=r"minimal: write#1:ioerr,write#2:ioerr"):
        report.raise_on_failure()
    print(report.summary())
