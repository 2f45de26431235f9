"""Crash states: disk images a power cut could have left, built from a write log.

The durability rules are virtio 1.2 §5.2.6.2 (Device Requirements: Device
Operation): a completed write is *volatile* until it becomes *stable*, and
it becomes stable when (1) VIRTIO_BLK_F_FLUSH was offered but neither it nor
VIRTIO_BLK_F_CONFIG_WCE was negotiated, (2) CONFIG_WCE was negotiated and
``writeback`` was 0 from the write's submission to its completion, or (3) a
VIRTIO_BLK_T_FLUSH sent after the write completed has completed itself.
Our :class:`~.blk.BlkDevice` offers FLUSH and CONFIG_WCE with ``writeback``
1, so a Linux guest runs in case (3), :attr:`Durability.WRITE_BACK`; cases
(1) and (2) are :attr:`Durability.WRITE_THROUGH` (see :func:`durability_of`).

A power cut falls after some completed request, the *cut*.  Every record
up to the cut made durable by a flush completed up to the cut is on the
image; every other mutating record up to the cut (volatile) may or may not
be, in any subset (the contents of a volatile write's sectors are undefined
until it is stable, §5.2.6.2); nothing after the cut is.  The kept records
are applied in completion order, so of two overlapping writes both kept the
later one wins; a record is applied whole (no torn writes within a request).

Between two flush completions the durable set does not change, so a cut at
the end of such an *epoch* (just before the next flush completes) already
allows every subset a cut inside it allows.  The states are therefore: one
per completed flush (its boundary: exactly what it made durable), the final
state (everything completed applied), and a seeded sample of subsets of each
epoch's volatile records, CrashMonkey-style (Mohan et al., OSDI 2018), spread
round-robin over the epochs and never repeating an image.  Under
WRITE_THROUGH a state is a prefix of the log, so the sample is of cut points.

Discards: after a discard the contents of its sectors are unspecified
(§5.2.6.2; our storages return zeros).  A kept discard is applied as zeros
(:attr:`DiscardRule.ZEROES`, the default: what the live guest read back, so a
check that passes on the live disk is not failed by contents the device
never showed); a dropped one leaves the old data.  So a volatile discard is
seen both ways, a durable one as zeros.  :attr:`DiscardRule.OLD_DATA` builds
the other reading (kept discards leave old data) for a guest that must not
rely on discard zeroing; run both for the full picture.
"""

from __future__ import annotations

import bisect
import enum
import errno
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_virtio import files
from pytest_virtio.errors import BackendError
from pytest_virtio.vhost_user.blk import SECTOR_SIZE, FileStorage
from pytest_virtio.vhost_user.protocol import BlkFeature
from pytest_virtio.vhost_user.writelog import DATA_NAME, LogRecord, RecordedLog, RecordKind

__all__ = [
    "CrashState",
    "DiscardRule",
    "Durability",
    "StateKind",
    "crash_states",
    "durability_of",
    "materialize",
    "sparse_copy",
]

_DRAWS_PER_STATE = 32  # random draws tried per wanted state before an epoch counts as spent


class Durability(enum.Enum):
    """When a completed write survives a power cut (§5.2.6.2)."""

    #: Case (3): only once a flush that started after it has completed.
    WRITE_BACK = "write-back"
    #: Cases (1) and (2): at completion.
    WRITE_THROUGH = "write-through"


def durability_of(features: int, writeback: int) -> Durability:
    """The rule for a device with these negotiated ``features`` and config ``writeback``.

    ``writeback`` must have held for the whole run (a driver that toggles it
    mid-run leaves writes in between undefined, §5.2.6.2: use WRITE_BACK, a
    superset of the states).
    """
    flush = bool(features & BlkFeature.FLUSH)
    wce = bool(features & BlkFeature.CONFIG_WCE)
    if not flush and not wce:
        return Durability.WRITE_THROUGH
    if wce and not writeback:
        return Durability.WRITE_THROUGH
    return Durability.WRITE_BACK


class DiscardRule(enum.Enum):
    """What a kept discard leaves in its sectors (see the module docstring)."""

    ZEROES = "zeroes"
    OLD_DATA = "old-data"


class StateKind(enum.Enum):
    FLUSH_BOUNDARY = "flush-boundary"
    FINAL = "final"
    SUBSET = "subset"


@dataclass(frozen=True)
class CrashState:
    """One image a power cut could have left: which records are on it, which were lost.

    ``cut`` is the seq of the last request completed before the power cut;
    ``flushes`` how many flushes had completed by then; ``applied`` and
    ``dropped`` the seqs of mutating records up to the cut, in order (they
    partition them).
    """

    kind: StateKind
    cut: int
    flushes: int
    applied: tuple[int, ...]
    dropped: tuple[int, ...]
    discard: DiscardRule = DiscardRule.ZEROES

    def describe(self) -> str:
        """One line naming the state: its kind, the cut and the lost records."""
        lost = ", ".join(map(str, self.dropped)) or "none"
        return (f"{self.kind.value}: power cut after request {self.cut} "
                f"({self.flushes} flush(es) completed), {len(self.applied)} record(s) "
                f"applied, dropped: {lost}")


# --- enumeration ------------------------------------------------------------------


@dataclass(frozen=True)
class _Epoch:
    """Requests between two flush completions: the cut at its end and what may be lost.

    ``durable`` and ``upto`` count into the log's mutating seqs (in order):
    the first ``durable`` are stable, the rest of the first ``upto`` volatile.
    """

    index: int
    first: int  # first seq in the epoch (a flush, after the first epoch)
    cut: int  # last seq before the next flush completes (or the log's end)
    durable: int
    upto: int


def _epochs(records: Sequence[LogRecord], mutating: Sequence[int],
            durability: Durability) -> list[_Epoch]:
    flushes = [r for r in records if r.kind is RecordKind.FLUSH]
    ends = [f.seq - 1 for f in flushes] + [len(records)]
    epochs = []
    horizon = 0  # every seq <= horizon is durable
    first = 1
    for i, cut in enumerate(ends):
        if i:
            horizon = max(horizon, flushes[i - 1].flush_start)
        upto = bisect.bisect_right(mutating, cut)
        durable = upto if durability is Durability.WRITE_THROUGH else min(
            upto, bisect.bisect_right(mutating, horizon))
        epochs.append(_Epoch(i, first, cut, durable, upto))
        first = cut + 1
    return epochs


def _state(kind: StateKind, mutating: Sequence[int], cut: int, flushes: int,
           applied: Sequence[int], discard: DiscardRule) -> CrashState:
    kept = set(applied)
    upto = bisect.bisect_right(mutating, cut)
    dropped = tuple(s for s in mutating[:upto] if s not in kept)
    return CrashState(kind, cut, flushes, tuple(sorted(kept)), dropped, discard)


def _boundaries(mutating: Sequence[int], epochs: list[_Epoch],
                discard: DiscardRule) -> Iterator[CrashState]:
    """Right after each flush completed, nothing volatile kept; then the final state."""
    for epoch in epochs[1:]:
        yield _state(StateKind.FLUSH_BOUNDARY, mutating, epoch.first, epoch.index,
                     mutating[: epoch.durable], discard)
    last = epochs[-1]
    yield _state(StateKind.FINAL, mutating, last.cut, last.index, mutating[: last.upto],
                 discard)


def _draw(rng: random.Random, epoch: _Epoch, mutating: Sequence[int],
          durability: Durability) -> tuple[int, list[int]]:
    """One candidate (cut, applied) in ``epoch``: a subset of its volatile records, or a prefix."""
    if durability is Durability.WRITE_THROUGH:
        cut = rng.randint(epoch.first - 1 if epoch.index == 0 else epoch.first, epoch.cut)
        return cut, list(mutating[: bisect.bisect_right(mutating, cut)])
    volatile = mutating[epoch.durable : epoch.upto]
    mask = rng.getrandbits(len(volatile))
    kept = [s for i, s in enumerate(volatile) if mask >> i & 1]
    return epoch.cut, [*mutating[: epoch.durable], *kept]


def _space(epoch: _Epoch, durability: Durability) -> int:
    """How many distinct candidates an epoch has."""
    if durability is Durability.WRITE_THROUGH:
        return epoch.cut - epoch.first + (2 if epoch.index == 0 else 1)
    return 1 << (epoch.upto - epoch.durable)


def _sample(mutating: Sequence[int], epochs: list[_Epoch], durability: Durability,
            rng: random.Random, count: int, seen: set[tuple[int, ...]],
            discard: DiscardRule) -> Iterator[CrashState]:
    """Up to ``count`` new images, round-robin over the epochs that can still give one."""
    live = [e for e in epochs if _space(e, durability) > 1]
    tries = {e.index: 0 for e in live}
    made = 0
    while made < count and live:
        for epoch in list(live):
            if made >= count:
                break
            cut, applied = _draw(rng, epoch, mutating, durability)
            key = tuple(applied)
            tries[epoch.index] += 1
            if key not in seen:
                seen.add(key)
                made += 1
                yield _state(StateKind.SUBSET, mutating, cut, epoch.index, applied, discard)
            elif tries[epoch.index] > _DRAWS_PER_STATE * min(count, _space(epoch, durability)):
                live.remove(epoch)


def crash_states(log: RecordedLog, *, durability: Durability = Durability.WRITE_BACK,
                 seed: int = 0, subsets: int = 16,
                 discard: DiscardRule = DiscardRule.ZEROES) -> list[CrashState]:
    """Every flush boundary, the final state, and up to ``subsets`` sampled states.

    Deterministic for a log, ``seed`` and ``subsets``; no two states give the
    same image (the same applied records).  A broken log raises
    :class:`~.writelog.WriteLogBroken`.
    """
    if subsets < 0:
        raise ValueError(f"subsets must be >= 0, got {subsets}")
    log.check()
    mutating = [r.seq for r in log.records if r.mutates]
    epochs = _epochs(log.records, mutating, durability)
    seen: set[tuple[int, ...]] = set()
    states = []
    for state in _boundaries(mutating, epochs, discard):
        if state.applied not in seen:
            seen.add(state.applied)
            states.append(state)
    states.extend(_sample(mutating, epochs, durability, random.Random(seed), subsets, seen,
                          discard))
    return states


# --- materialization --------------------------------------------------------------


def sparse_copy(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` keeping holes (``src`` opened read-only, never written)."""
    if dest.exists() and os.path.samefile(src, dest):
        raise BackendError(f"crash image {dest} is the base image itself; name another file")
    files.sparse_copy(src, dest)


def _apply(disk: FileStorage, spill: int, record: LogRecord, discard: DiscardRule) -> None:
    if record.kind is RecordKind.WRITE:
        data = os.pread(spill, record.length, record.spill_offset)
        if disk.writev(record.offset, [memoryview(data)]) != record.length:
            raise OSError(errno.EIO, f"short write applying record {record.seq}")
    elif record.kind is RecordKind.WRITE_ZEROES:
        disk.write_zeroes(record.offset, record.length, record.unmap)
    elif record.kind is RecordKind.DISCARD and discard is DiscardRule.ZEROES:
        disk.discard(record.offset, record.length)


def _check_base(log: RecordedLog, base: Path) -> None:
    size = base.stat().st_size
    if size - size % SECTOR_SIZE != log.disk_size:
        raise BackendError(f"base image {base} has {size} bytes, the write log "
                           f"{log.directory} was recorded on a {log.disk_size}-byte disk; "
                           "pass the image the disk had when logging began")


def materialize(state: CrashState, log: RecordedLog, base: str | os.PathLike[str],
                dest: str | os.PathLike[str]) -> Path:
    """Write ``state``'s image to ``dest``: a sparse copy of ``base`` plus its applied records.

    ``base`` must hold the disk's contents when logging began; it is only read.
    """
    log.check()
    base_path, dest_path = Path(base), Path(dest)
    _check_base(log, base_path)
    sparse_copy(base_path, dest_path)
    spill = os.open(log.directory / DATA_NAME, os.O_RDONLY | os.O_CLOEXEC)
    disk = None
    try:
        disk = FileStorage(dest_path)
        for seq in state.applied:
            _apply(disk, spill, log.record(seq), state.discard)
    finally:
        os.close(spill)
        if disk is not None:
            disk.close()
    return dest_path
