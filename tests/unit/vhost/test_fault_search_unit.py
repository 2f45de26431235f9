"""The fault search (issue 28 item 5) on programs in miniature over the real device.

A "program" writes four blocks through a mock driver's ring into a real
BlkDevice, with the schedule armed on its real FaultInjector, then says
whether it succeeded.  The property: if it said so, the disk holds what it
wrote.  A program that ignores errors breaks it with one fault; one that
retries each write once but ignores the retry's status needs two; one that
checks holds under all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import pytest
from vhost_rig import Rig

from pytest_virtio.errors import BackendError, ConfigError
from pytest_virtio.guests.faultsearch import FaultScheduleFailed, search_faults
from pytest_virtio.vhost_user.faultschedule import Schedule, armed
from pytest_virtio.vhost_user.protocol import BlkStatus, BlkType

BLOCK = 4096
BLOCKS = [bytes([0x41 + i]) * BLOCK for i in range(4)]
Program = Callable[[Rig], bool]


def _write(rig: Rig, index: int) -> int:
    return rig.do(BlkType.OUT, index * BLOCK // 512, BLOCKS[index])


def _program(*, retries: int, check: bool) -> Program:
    def run(rig: Rig) -> bool:
        ok = True
        for i in range(len(BLOCKS)):
            for _ in range(1 + retries):
                if _write(rig, i) == BlkStatus.OK:
                    break
            else:
                ok = False
        return ok or not check
    return run


fragile = _program(retries=0, check=False)
retrying = _program(retries=1, check=False)
robust = _program(retries=1, check=True)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(size=64)
    yield r
    r.close()


def _trial(rig: Rig, program: Program) -> Callable[[Schedule], None]:
    def trial(schedule: Schedule) -> None:
        rig.storage.write_zeroes(0, BLOCK * len(BLOCKS))
        with armed(rig.faults, schedule):
            said_ok = program(rig)
        if said_ok:
            held = [bytes(rig.storage.data[i * BLOCK:(i + 1) * BLOCK]) for i in range(4)]
            lost = [i for i, (got, want) in enumerate(zip(held, BLOCKS, strict=True))
                    if got != want]
            assert not lost, f"the program said OK but block(s) {lost} do not hold its data"
    return trial


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ignoring_errors_shrinks_to_the_first_write_failing(rig: Rig, seed: int) -> None:
    report = search_faults(_trial(rig, fragile), types=("write", "flush"), max_ordinal=8,
                           seed=seed)
    assert str(report.minimal) == "write#1:ioerr"
    assert report.message.startswith("the program said OK but block(s) [0] do not hold its data")
    assert report.seed == seed


def test_retrying_once_needs_two_faults_in_a_row(rig: Rig) -> None:
    report = search_faults(_trial(rig, retrying), types=("write",), max_ordinal=4, seed=0)
    assert str(report.minimal) == "write#1:ioerr,write#2:ioerr"
    assert any(not t.failed and len(t.schedule) == 1 for t in report.trials)  # one is survived


def test_a_program_that_checks_holds_under_every_schedule(rig: Rig) -> None:
    ran: list[Schedule] = []
    trial = _trial(rig, robust)

    def counted(schedule: Schedule) -> None:
        ran.append(schedule)
        trial(schedule)

    report = search_faults(counted, types=("write",), max_ordinal=4, seed=0, examples=40)
    assert report.minimal is None and not report.failed
    assert report.summary().endswith("none broke the property")
    report.raise_on_failure()
    # the whole space (the empty schedule, 4 singles, 6 pairs) was tried, each once
    assert len(ran) == len(set(ran)) == 11
    assert [t.schedule for t in report.trials] == ran


def test_the_same_seed_tries_the_same_schedules(rig: Rig) -> None:
    runs = [search_faults(_trial(rig, retrying), types=("write", "flush"), max_ordinal=6,
                          seed=7) for _ in range(2)]
    assert runs[0].trials == runs[1].trials
    assert runs[0].minimal == runs[1].minimal


def test_the_failure_prints_the_minimal_schedule_and_how_to_replay_it(rig: Rig) -> None:
    trial = _trial(rig, retrying)
    report = search_faults(trial, types=("write",), max_ordinal=4, seed=3)
    with pytest.raises(FaultScheduleFailed) as info:
        report.raise_on_failure()
    text = str(info.value)
    assert "minimal: write#1:ioerr,write#2:ioerr (2 fault(s))" in text
    assert "trial(Schedule.parse('write#1:ioerr,write#2:ioerr'))" in text
    assert "seed=3" in text and "block(s) [0]" in text
    assert info.value.schedule == report.minimal and info.value.seed == 3
    replayed = Schedule.parse(text.split("Schedule.parse(")[1].split(")")[0].strip("'"))
    with pytest.raises(AssertionError, match=r"block\(s\) \[0\]"):
        trial(replayed)


def test_an_error_that_is_not_the_property_ends_the_search(rig: Rig) -> None:
    seen: list[Schedule] = []
    broken = BackendError("queue 0 broken: the guest is gone")

    def trial(schedule: Schedule) -> None:
        seen.append(schedule)
        if len(seen) == 2:
            raise broken
        _trial(rig, fragile)(schedule)

    with pytest.raises(BackendError) as info:
        search_faults(trial, seed=0)
    assert info.value is broken
    assert len(seen) == 2


def test_delays_are_searched_too(rig: Rig) -> None:
    """A program with a deadline per write: only a delay breaks it, never an I/O error."""
    def trial(schedule: Schedule) -> None:
        with armed(rig.faults, schedule):
            for i in range(len(BLOCKS)):
                start = time.monotonic()
                _write(rig, i)
                assert time.monotonic() - start < 0.05, f"write {i} missed its deadline"

    report = search_faults(trial, types=("write", "flush"), max_ordinal=4, delays=(0.1,),
                           seed=0)
    assert str(report.minimal) == "write#1:delay=0.1"
    assert report.message.startswith("write 0 missed its deadline")


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"types": ("wrte",)}, "unknown request type 'wrte'; one of read, write, flush"),
    ({"types": ()}, "leaves no request to fail"),
    ({"max_ordinal": 0}, "max_ordinal=0"),
    ({"delays": (0.0,)}, "seconds > 0, got 0.0"),
])
def test_a_bad_search_is_refused_before_any_trial(kwargs: dict[str, object], why: str) -> None:
    seen: list[Schedule] = []
    with pytest.raises(ConfigError, match=why):
        search_faults(seen.append, **kwargs)  # type: ignore[arg-type]
    assert seen == []


def test_each_trial_is_logged(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pytest_virtio")
    report = search_faults(_trial(rig, fragile), types=("write",), max_ordinal=2, seed=0)
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("faultsearch")]
    trials = [line for line in lines if line.startswith("fault search trial")]
    assert len(trials) == len(report.trials)
    assert "fault search trial 1: none held" in trials
    assert any("write#1:ioerr broke the property" in line for line in trials)
    assert any("fired write#1:ioerr" in r.getMessage() for r in caplog.records
               if r.name.endswith("faultschedule"))
