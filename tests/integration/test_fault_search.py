"""Fault schedules that search themselves, on a real guest (issue 28 item 5).

A guest-side program writes three 4 KiB blocks to an in-process vhost-user-blk
disk with ``dd oflag=direct`` (no page cache: each block is one write request
the backend serves), retrying a failed write once, and prints OK.  The
property: if it printed OK, the disk holds what it wrote.  The fragile program
ignores the retry's status, so it survives any single I/O error but not two in
a row on one block; the search finds that and shrinks it to
``write#1:ioerr,write#2:ioerr``, and the printed schedule replays the same
failure.  The robust program checks the retry and says FAILED instead: the
same search finds nothing.

One guest serves every trial: each trial writes content of its own (the trial
number is in every block), so a block a trial failed to write holds the previous
trial's data and never passes for its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from pytest_virtio.guests.faultsearch import (
    FaultScheduleFailed,
    FaultSearchReport,
    search_faults,
)
from pytest_virtio.guests.guest import Guest
from pytest_virtio.spec import Disk, MachineSpec
from pytest_virtio.vhost_user import VhostUserBlkServer
from pytest_virtio.vhost_user.faultschedule import Schedule, armed

BLOCK, BLOCKS = 4096, 3
# w I: write block I of this trial's content (one O_DIRECT request); exit status dd's.
WRITE_BLOCK = ("w() {{ printf '%{block}s' \"trial {trial} block $1\" | "
               "dd of={dev} bs={block} seek=$1 oflag=direct iflag=fullblock 2>/dev/null; }}; ")
FRAGILE = "for i in {blocks}; do w $i || w $i; done; echo OK"
ROBUST = "ok=OK; for i in {blocks}; do w $i || w $i || ok=FAILED; done; echo $ok"


@dataclass
class Program:
    """One guest-side program run as a search's trial on the shared guest."""

    guest: Guest
    disk: VhostUserBlkServer
    text: str
    dev: str
    said: list[tuple[str, str]] = field(default_factory=list)  # (schedule, what it printed)
    trials: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __call__(self, schedule: Schedule) -> None:
        trial = next(self.trials)
        cmd = (WRITE_BLOCK + self.text).format(trial=trial, block=BLOCK, dev=self.dev,
                                               blocks=" ".join(map(str, range(BLOCKS))))
        with armed(self.disk.faults, schedule) as arm:
            out = self.guest.check(cmd).stdout.strip()
        self.said.append((str(schedule), out))
        if out == "FAILED":
            return
        if out != "OK":  # not the property: a broken trial, which ends the search
            raise RuntimeError(f"the program printed {out!r}, neither OK nor FAILED")
        lost = [i for i in range(BLOCKS) if self._block(i) != _content(trial, i)]
        assert not lost, (f"the program said OK but block(s) {lost} do not hold what it "
                          f"wrote (faults that fired: {arm.fired})")

    def _block(self, index: int) -> bytes:
        buf = bytearray(BLOCK)
        assert self.disk.storage.readv(index * BLOCK, [memoryview(buf)]) == BLOCK
        return bytes(buf)


def _content(trial: int, index: int) -> bytes:
    """What ``printf '%4096s' "trial T block I"`` writes."""
    return f"trial {trial} block {index}".rjust(BLOCK).encode()


@pytest.fixture(scope="module")
def shared(boot_shared: Callable[[MachineSpec, str], Guest]) -> Guest:
    spec = MachineSpec(disks=(Disk(name="data", bus="vhost-user-blk", size="4M"),))
    return boot_shared(spec, "faultsearch")


def _program(guest: Guest, text: str) -> Program:
    disk: VhostUserBlkServer = guest.backends["data"]
    disk.faults.clear()
    return Program(guest, disk, text, guest.disk_path("data"))


def _search(program: Program) -> FaultSearchReport:
    """Up to two I/O errors among the first four writes (11 schedules), 12 draws."""
    report = search_faults(program, types=("write",), max_faults=2, max_ordinal=2 * BLOCKS - 2,
                           examples=12, seed=0)
    print(report.summary())
    return report


def test_fragile_program_shrinks_to_two_faults_that_replay(shared: Guest) -> None:
    fragile = _program(shared, FRAGILE)
    report = _search(fragile)
    assert str(report.minimal) == "write#1:ioerr,write#2:ioerr", report.summary()
    assert ("write#1:ioerr", "OK") in fragile.said  # one error it survives (the retry)
    with pytest.raises(FaultScheduleFailed) as info:
        report.raise_on_failure()
    printed = str(info.value).split("Schedule.parse('")[1].split("')")[0]
    with pytest.raises(AssertionError, match=r"block\(s\) \[0\] do not hold") as again:
        fragile(Schedule.parse(printed))
    assert "fired: write#1:ioerr,write#2:ioerr" in str(again.value)
    assert not shared.backends["data"].faults.rules


def test_robust_program_passes_the_same_search(shared: Guest) -> None:
    robust = _program(shared, ROBUST)
    report = _search(robust)
    assert report.minimal is None, report.summary()
    report.raise_on_failure()
    assert ("write#1:ioerr,write#2:ioerr", "FAILED") in robust.said  # the faults reached it
    assert len(report.trials) == len(robust.said) >= 5
