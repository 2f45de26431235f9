"""Fault schedules (issue 28 item 5): the text form, and arming on the real blk device.

The arming tests drive a real BlkDevice + Virtqueue + FaultInjector through a
mock driver's ring in synthetic guest memory (``vhost_rig``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vhost_rig import Rig

from pytest_virtio.errors import ConfigError
from pytest_virtio.vhost_user.faultschedule import (
    Fault,
    FaultKind,
    RequestType,
    Schedule,
    armed,
)
from pytest_virtio.vhost_user.protocol import BlkStatus, BlkType

OK, IOERR = BlkStatus.OK, BlkStatus.IOERR

faults = st.one_of(
    st.builds(Fault, st.sampled_from(RequestType), st.integers(1, 10**9)),
    st.builds(Fault, st.sampled_from(RequestType), st.integers(1, 10**9),
              st.just(FaultKind.DELAY),
              st.floats(min_value=1e-9, max_value=1e9, allow_nan=False, allow_infinity=False)),
)
any_schedule = st.lists(faults, max_size=6, unique=True).map(lambda fs: Schedule(tuple(fs)))


@given(any_schedule)
def test_text_form_round_trips(schedule: Schedule) -> None:
    text = str(schedule)
    assert Schedule.parse(text) == schedule
    assert str(Schedule.parse(text)) == text
    assert " " not in text


@given(st.permutations([Fault.parse(t) for t in ("flush#1:ioerr", "write#3:ioerr",
                                                  "write#1:delay=0.5", "any#2:ioerr")]))
def test_a_schedule_is_sorted_whatever_the_order_given(order: list[Fault]) -> None:
    want = "write#1:delay=0.5,write#3:ioerr,flush#1:ioerr,any#2:ioerr"
    assert str(Schedule(tuple(order))) == want


def test_the_empty_schedule_reads_none() -> None:
    assert str(Schedule()) == "none"
    assert Schedule.parse("none") == Schedule.parse(" ") == Schedule()
    assert len(Schedule.parse("write#1:ioerr , flush#2:ioerr")) == 2


@pytest.mark.parametrize(("text", "why"), [
    ("wrte#3:ioerr", "unknown request type 'wrte'"),
    ("write#0:ioerr", "counts from 1"),
    ("write#3", "not of the form"),
    ("write#3:explode", "unknown kind 'explode'"),
    ("write#3:delay", "the form is"),
    ("write#3:ioerr=2", "the form is"),
    ("read#1:delay=0", "seconds > 0"),
    ("read#1:delay=nan", "seconds > 0"),
    ("write#1:ioerr,write#1:ioerr", "appears twice"),
])
def test_bad_text_names_the_fault_and_the_form(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        Schedule.parse(text)
    assert repr(text.split(",")[0]) in str(info.value) or repr(text) in str(info.value)


def test_faults_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="takes no seconds"):
        Fault(RequestType.WRITE, 1, FaultKind.IOERR, 0.5)
    with pytest.raises(ValueError, match="must be a RequestType"):
        Fault("write", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="counts from 1"):
        Fault(RequestType.WRITE, True)


# --- arming on the real device ------------------------------------------------------


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(size=64)
    yield r
    r.close()


def _write(rig: Rig, sector: int = 0) -> int:
    return rig.do(BlkType.OUT, sector, b"w" * 512)


def _read(rig: Rig, sector: int = 0) -> int:
    return rig.do(BlkType.IN, sector, 512)


def _flush(rig: Rig) -> int:
    return rig.do(BlkType.FLUSH)


def test_each_fault_hits_exactly_its_request_counted_from_arming(rig: Rig) -> None:
    assert [_write(rig), _write(rig)] == [OK, OK]  # before arming: not counted
    with armed(rig.faults, Schedule.parse("write#1:ioerr,write#3:ioerr,flush#2:ioerr")) as arm:
        writes = [_write(rig) for _ in range(4)]
        flushes = [_flush(rig) for _ in range(3)]
        reads = [_read(rig) for _ in range(2)]
    assert writes == [IOERR, OK, IOERR, OK]  # write#1 failing does not shift write#3
    assert flushes == [OK, IOERR, OK]
    assert reads == [OK, OK]
    assert str(arm.fired) == "write#1:ioerr,write#3:ioerr,flush#2:ioerr"
    assert str(arm.unfired) == "none"


def test_any_counts_every_request_type(rig: Rig) -> None:
    with armed(rig.faults, Schedule.parse("any#3:ioerr")):
        got = [_read(rig), _flush(rig), _write(rig), _read(rig)]
    assert got == [OK, OK, IOERR, OK]


def test_unfired_faults_are_reported_and_everything_is_disarmed_on_exit(rig: Rig) -> None:
    standing = rig.faults.fail_sectors(1000, 1008)  # the test's own rule stays
    with pytest.raises(RuntimeError, match="program died"), armed(
            rig.faults, Schedule.parse("write#1:ioerr,write#5:ioerr,read#1:ioerr")) as arm:
        assert _write(rig) == IOERR
        raise RuntimeError("program died")
    assert str(arm.fired) == "write#1:ioerr"
    assert str(arm.unfired) == "read#1:ioerr,write#5:ioerr"
    assert rig.faults.rules == [standing]
    assert [_write(rig), _read(rig), _write(rig, 1000)] == [OK, OK, IOERR]


def test_a_delay_holds_its_request_then_serves_it(rig: Rig) -> None:
    with armed(rig.faults, Schedule.parse("flush#2:delay=0.2")) as arm:
        t0 = time.monotonic()
        assert _flush(rig) == OK
        first = time.monotonic() - t0
        t0 = time.monotonic()
        assert _flush(rig) == OK
        second = time.monotonic() - t0
    assert first < 0.2 <= second
    assert str(arm.fired) == "flush#2:delay=0.2"
    assert not rig.faults.active
