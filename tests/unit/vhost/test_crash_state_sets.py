"""Crash states from a write log (issue 28 item 2): enumeration rules and the images built."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from logged_rig import LoggedRig

from pytest_virtio.errors import BackendError
from pytest_virtio.vhost_user.blk import BlkDevice, FileStorage, MemoryStorage
from pytest_virtio.vhost_user.crashstates import (
    CrashState,
    DiscardRule,
    Durability,
    StateKind,
    crash_states,
    durability_of,
    materialize,
    sparse_copy,
)
from pytest_virtio.vhost_user.protocol import BlkFeature, BlkStatus
from pytest_virtio.vhost_user.writelog import RecordedLog, RecordKind

DISK = 64 << 10
SECTORS = DISK // 512


@dataclass(frozen=True)
class Op:
    """One guest request: ("write", sector, data) / ("flush",) / ("discard"|"zeroes", sector, n)."""

    kind: str
    sector: int = 0
    sectors: int = 0
    data: bytes = b""


def _run(rig: LoggedRig, ops: list[Op]) -> None:
    for op in ops:
        if op.kind == "write":
            status = rig.write(op.sector, op.data)
        elif op.kind == "flush":
            status = rig.flush()
        elif op.kind == "discard":
            status = rig.discard(op.sector, op.sectors)
        else:
            status = rig.zeroes(op.sector, op.sectors)
        assert status == BlkStatus.OK


def _model(base: bytes, ops: list[Op], state: CrashState, log: RecordedLog,
           discard: DiscardRule) -> bytes:
    """The image a state stands for, from the guest's own requests (not from the spill)."""
    mutating = [op for op in ops if op.kind != "flush"]
    by_seq = dict(zip((r.seq for r in log.records if r.mutates), mutating, strict=True))
    image = bytearray(base)
    for seq in state.applied:
        op = by_seq[seq]
        lo = op.sector * 512
        if op.kind == "write":
            image[lo : lo + len(op.data)] = op.data
        elif op.kind == "zeroes" or discard is DiscardRule.ZEROES:
            image[lo : lo + op.sectors * 512] = bytes(op.sectors * 512)
    return bytes(image)


def _base(path: Path, size: int = DISK) -> bytes:
    """A base image with data in places and holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for at in (0, size // 2):
            f.seek(at)
            f.write(os.urandom(4096))
    return path.read_bytes()


def _logged_run(tmp: Path, ops: list[Op], size: int = DISK) -> tuple[bytes, RecordedLog, bytes]:
    """(base bytes, the log, the live disk's bytes) of ``ops`` on a copy of a base image."""
    base = _base(tmp / "base.img", size)
    sparse_copy(tmp / "base.img", tmp / "live.img")
    rig = LoggedRig(tmp / "log", FileStorage(tmp / "live.img"), storage_size=size)
    try:
        _run(rig, ops)
        rig.log.close()
    finally:
        rig.logged.close()
        rig.close()
    return base, RecordedLog.load(tmp / "log"), (tmp / "live.img").read_bytes()


def _w(sector: int, n: int = 1, fill: int | None = None) -> Op:
    data = os.urandom(512 * n) if fill is None else bytes([fill]) * (512 * n)
    return Op("write", sector, n, data)


FLUSH = Op("flush")


def test_flush_boundaries_and_the_final_state(tmp_path: Path) -> None:
    ops = [_w(0), _w(1), FLUSH, _w(2), _w(3), FLUSH, _w(4)]
    _, log, _ = _logged_run(tmp_path, ops)
    states = crash_states(log, subsets=0)
    assert [(s.kind, s.cut, s.flushes, s.applied, s.dropped) for s in states] == [
        (StateKind.FLUSH_BOUNDARY, 3, 1, (1, 2), ()),
        (StateKind.FLUSH_BOUNDARY, 6, 2, (1, 2, 4, 5), ()),
        (StateKind.FINAL, 7, 2, (1, 2, 4, 5, 7), ()),
    ]
    assert "dropped: none" in states[0].describe()


def test_subsets_are_seeded_counted_and_distinct(tmp_path: Path) -> None:
    ops = [_w(0), FLUSH, *(_w(i) for i in range(1, 11)), FLUSH, _w(11), _w(12)]
    _, log, _ = _logged_run(tmp_path, ops)
    one = crash_states(log, seed=1, subsets=8)
    assert one == crash_states(log, seed=1, subsets=8)  # deterministic for a seed
    assert one != crash_states(log, seed=2, subsets=8)
    sampled = [s for s in one if s.kind is StateKind.SUBSET]
    assert len(sampled) == 8
    assert len({s.applied for s in one}) == len(one)  # no image twice
    # The last epoch has 2 volatile writes: 4 images, 2 already a boundary and the final.
    small = crash_states(log, seed=3, subsets=10_000)
    last_epoch = {s.applied for s in small if s.cut == 15}
    assert last_epoch == {(1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14),
                          (1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15),
                          (1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15)}
    # 2 boundaries + final; epoch 0 adds the base (); epoch 1's 2**10 subsets less its
    # empty one (= the first boundary) and its full one (= the second); epoch 2 adds 2.
    assert len(small) == 3 + 1 + (2**10 - 2) + 2


def test_write_through_states_are_prefixes(tmp_path: Path) -> None:
    ops = [_w(0), _w(1), FLUSH, _w(2), _w(3)]
    _, log, _ = _logged_run(tmp_path, ops)
    states = crash_states(log, durability=Durability.WRITE_THROUGH, seed=5, subsets=100)
    assert {s.applied for s in states} == {(), (1,), (1, 2), (1, 2, 4), (1, 2, 4, 5)}
    assert all(not s.dropped for s in states)


def test_durability_follows_the_negotiated_features() -> None:
    ours = BlkDevice(MemoryStorage(DISK)).features
    assert durability_of(ours, writeback=1) is Durability.WRITE_BACK
    assert durability_of(ours, writeback=0) is Durability.WRITE_THROUGH  # §5.2.6.2 case 2
    plain = ours & ~(BlkFeature.FLUSH | BlkFeature.CONFIG_WCE)
    assert durability_of(plain, writeback=1) is Durability.WRITE_THROUGH  # case 1


def test_discard_rules(tmp_path: Path) -> None:
    ops = [_w(0, fill=0xAA), FLUSH, Op("discard", 0, 1), FLUSH, Op("discard", 0, 1)]
    base, log, live = _logged_run(tmp_path, ops)
    for rule, after in ((DiscardRule.ZEROES, bytes(512)), (DiscardRule.OLD_DATA, b"\xaa" * 512)):
        final = next(s for s in crash_states(log, subsets=0, discard=rule)
                     if s.kind is StateKind.FINAL)
        image = materialize(final, log, tmp_path / "base.img", tmp_path / f"{rule.value}.img")
        assert image.read_bytes()[:512] == after
    assert live[:512] == bytes(512)  # what the live guest read back
    seen = {materialize(s, log, tmp_path / "base.img", tmp_path / "z.img").read_bytes()[:512]
            for s in crash_states(log, subsets=8)}
    # the base (the first write was volatile too), and the last, volatile discard both ways
    assert seen == {base[:512], b"\xaa" * 512, bytes(512)}


def test_materialize_keeps_the_base_and_holes(tmp_path: Path) -> None:
    size = 64 << 20
    ops = [_w(8, 8), FLUSH, _w(4096, 16), Op("zeroes", 0, 8)]
    base, log, live = _logged_run(tmp_path, ops, size)
    base_path = tmp_path / "base.img"
    before = (hashlib.sha256(base).hexdigest(), base_path.stat().st_mtime_ns)
    for i, state in enumerate(crash_states(log, subsets=4)):
        image = materialize(state, log, base_path, tmp_path / f"s{i}.img")
        assert image.read_bytes() == _model(base, ops, state, log, DiscardRule.ZEROES)
        if state.kind is StateKind.FINAL:
            assert image.read_bytes() == live
        assert image.stat().st_blocks * 512 <= base_path.stat().st_blocks * 512 + (64 << 10)
    assert (hashlib.sha256(base_path.read_bytes()).hexdigest(),
            base_path.stat().st_mtime_ns) == before
    with pytest.raises(BackendError, match="is the base image itself"):
        materialize(state, log, base_path, base_path)
    (tmp_path / "short.img").write_bytes(bytes(4096))
    with pytest.raises(BackendError, match="pass the image the disk had when logging began"):
        materialize(state, log, tmp_path / "short.img", tmp_path / "x.img")


_ops = st.lists(st.one_of(
    st.builds(lambda s, n, b: Op("write", s, n, bytes([b]) * 512 * n),
              st.integers(0, SECTORS - 8), st.integers(1, 8), st.integers(1, 255)),
    st.just(FLUSH),
    st.builds(lambda s, n: Op("discard", s, n), st.integers(0, SECTORS - 8), st.integers(1, 8)),
    st.builds(lambda s, n: Op("zeroes", s, n), st.integers(0, SECTORS - 8), st.integers(1, 8)),
), min_size=1, max_size=14)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, seed=st.integers(0, 2**32), discard=st.sampled_from(DiscardRule))
def test_every_state_is_one_a_power_cut_allows(ops: list[Op], seed: int,
                                               discard: DiscardRule) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="crash-prop"))
    try:
        base, log, live = _logged_run(tmp, ops)
        states = crash_states(log, seed=seed, subsets=6, discard=discard)
        flushes = [r for r in log.records if r.kind is RecordKind.FLUSH]
        mutating = [r.seq for r in log.records if r.mutates]
        for i, state in enumerate(states):
            upto = [s for s in mutating if s <= state.cut]
            assert sorted(state.applied + state.dropped) == upto  # a partition of the cut
            assert not set(state.applied) & set(state.dropped)
            made_durable = max((f.flush_start for f in flushes if f.seq <= state.cut), default=0)
            assert all(d > made_durable for d in state.dropped), state.describe()
            image = materialize(state, log, tmp / "base.img", tmp / f"s{i}.img")
            assert image.read_bytes() == _model(base, ops, state, log, discard)
        final = [s for s in states if s.kind is StateKind.FINAL]
        assert len(final) <= 1 and all(not s.dropped for s in final)
        if discard is DiscardRule.ZEROES:
            everything = _model(base, ops, CrashState(StateKind.FINAL, len(log.records), 0,
                                                      tuple(mutating), ()), log, discard)
            assert everything == live  # the final image is the live disk
        for flush in flushes:  # every flush boundary is among the images
            assert tuple(s for s in mutating if s <= flush.flush_start) in {
                s.applied for s in states}
    finally:
        shutil.rmtree(tmp)
