"""Kernel splats: the reports a kernel prints when something went wrong but it went on.

A panic stops the guest and is caught on the console; a splat does not, so a test
passes over it unless someone reads the log.  kola and syzkaller fail on these, and
so does pytest-virtio (issue 26).  Each kind is matched on the first line of its
report, anchored at the start of a kernel record (facility 0), so a user program's
output or a line quoting one cannot pass for it; the report is that line plus the
records after it up to the kernel's ``---[ end trace`` line, the next splat, or
``MAX_LINES``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pytest_virtio.channels.kmsg import KmsgRecord

__all__ = ["KINDS", "MAX_LINES", "Splat", "find_splats", "splat_kind"]

#: (kind, pattern of a report's first line), checked in order.
KINDS: Final[tuple[tuple[str, re.Pattern[str]], ...]] = tuple(
    (kind, re.compile(pattern)) for kind, pattern in (
        ("lockdep", r"WARNING: (possible (circular|recursive) locking|inconsistent lock state"
                    r"|suspicious RCU usage|bad unlock balance|held lock freed)"),
        ("warning", r"WARNING: CPU: \d+ PID: \d+ at "),
        ("kasan", r"BUG: KASAN: "),
        ("kfence", r"BUG: KFENCE: "),
        ("soft lockup", r"(watchdog: )?BUG: soft lockup"),
        ("bug", r"BUG: "),
        ("kernel BUG", r"kernel BUG at "),
        ("oops", r"Oops: |general protection fault"),
        ("ubsan", r"UBSAN: "),
        ("hard lockup", r"(NMI )?[Ww]atchdog: Watchdog detected hard LOCKUP"),
        ("hung task", r"INFO: task \S+ blocked for more than \d+ seconds"),
        ("rcu stall", r"(rcu: )?INFO: rcu_\w+ (self-)?detected (expedited )?stalls?"),
        ("list corruption", r"list_(add|del) corruption"),
        # virtio_ring's BAD_RING: dev_err("%s:" fmt, __func__): "virtio_blk virtio1:
        # virtqueue_get_buf_ctx_split:id 7 is not a head!"
        ("virtio ring", r".*:(id \d+ is not a head!|id \d+ out of range)"),
    )
)
#: A report is its first line and at most this many records after it.
MAX_LINES: Final = 60
_END = re.compile(r"---\[ end trace ")


@dataclass(frozen=True)
class Splat:
    """One splat: its kind, first line and whole report (as dmesg prints it)."""

    kind: str
    title: str
    report: str
    seq: int

    def matches(self, pattern: re.Pattern[str]) -> bool:
        """Whether an allowed pattern names this splat (searched in the whole report)."""
        return pattern.search(self.report) is not None


def splat_kind(record: KmsgRecord) -> str | None:
    """The kind of splat ``record`` opens, or None (user records never open one)."""
    if not record.from_kernel:
        return None
    for kind, pattern in KINDS:
        if pattern.match(record.text):
            return kind
    return None


def find_splats(records: Sequence[KmsgRecord]) -> list[Splat]:
    """Every splat in ``records`` (in log order), each with its report."""
    splats = []
    i = 0
    while i < len(records):
        kind = splat_kind(records[i])
        if kind is None:
            i += 1
            continue
        end = _report_end(records, i)
        lines = [r.line() for r in records[i:end] if r.from_kernel]
        splats.append(Splat(kind, records[i].text, "\n".join(lines), records[i].seq))
        i = end
    return splats


def _report_end(records: Sequence[KmsgRecord], start: int) -> int:
    """Index after the last record of the report opened at ``start``."""
    stop = min(len(records), start + 1 + MAX_LINES)
    for j in range(start + 1, stop):
        if _END.search(records[j].text):
            return j + 1
        if splat_kind(records[j]) is not None:
            return j
    return stop
