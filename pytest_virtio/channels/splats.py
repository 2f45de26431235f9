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
                    r"|suspicious RCU usage|bad unlock balance|held lock freed"
                    r"|possible irq lock inversion|\S+-safe -> \S+-unsafe lock order"
                    r"|lock held when returning to user space|Nested lock was not taken"
                    r"|bad contention detected|\S+/\d+ still has locks held)"),
        ("warning", r"WARNING: CPU: \d+ PID: \d+ at "),
        ("kasan", r"BUG: KASAN: "),
        ("kfence", r"BUG: KFENCE: "),
        ("soft lockup", r"(watchdog: )?BUG: soft lockup"),
        ("bug", r"BUG: "),
        ("slab corruption", r"BUG \S+ \(.*\): "),
        ("kernel BUG", r"kernel BUG at "),
        # die(): "Oops: 0000 [#1]", "invalid opcode: 0000 [#1]", "divide error: 0000 [#1]"...
        ("oops", r"Oops: |general protection fault|[\w ,.-]+: [0-9a-f]{4} \[#\d+\]"),
        ("ubsan", r"UBSAN: "),
        ("hard lockup", r"(NMI )?[Ww]atchdog: Watchdog detected hard LOCKUP"),
        ("hung task", r"INFO: task .+:\d+ blocked for more than \d+ seconds"),
        ("rcu stall", r"(rcu: )?INFO: rcu_\w+ (self-)?detected (expedited )?stalls?"),
        ("list corruption", r"list_(add|del) corruption"),
        # virtio_ring's BAD_RING: dev_err("%s:" fmt, vq name): "virtio_blk virtio1:
        # req.0:id 7 is not a head!"
        ("virtio ring", r".*:(id \d+ is not a head!|id \d+ out of range)"),
    )
)
#: A report is its first line and at most this many records after it.
MAX_LINES: Final = 60
_END = re.compile(r"---\[ end trace ")
#: __warn_printk prints this, then the WARN's own message, then "WARNING: CPU: ...":
#: a report opened here starts with the message and reaches the end-trace line whole.
_CUT_HERE = re.compile(r"-+\[ cut here \]-+$")
#: How far after a cut-here line its splat's first line may come.
_CUT_REACH: Final = 8


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
        splat, end = _cut_here_splat(records, i) or _plain_splat(records, i) or (None, i + 1)
        if splat is not None:
            splats.append(splat)
        i = end
    return splats


def _plain_splat(records: Sequence[KmsgRecord], i: int) -> tuple[Splat, int] | None:
    """A splat whose first line is ``records[i]``; its report ends at the next one."""
    kind = splat_kind(records[i])
    if kind is None:
        return None
    end = _report_end(records, i, stop_at_next=True)
    return _splat(kind, records, i, i, end), end


def _cut_here_splat(records: Sequence[KmsgRecord], i: int) -> tuple[Splat, int] | None:
    """A WARN's block: the cut-here line, the message, ``WARNING: CPU:``, the trace.

    One splat, named by its first recognised line (``list_add corruption`` rather
    than the WARNING that follows it), whose report holds the message, so an
    ``allow=`` pattern on the WARN's own text matches."""
    if not (records[i].from_kernel and _CUT_HERE.search(records[i].text)):
        return None
    for j in range(i + 1, min(len(records), i + 1 + _CUT_REACH)):
        kind = splat_kind(records[j])
        if kind is not None:
            end = _report_end(records, j, stop_at_next=False)
            return _splat(kind, records, i, j, end), end
    return None


def _splat(kind: str, records: Sequence[KmsgRecord], start: int, title: int,
           end: int) -> Splat:
    lines = [r.line() for r in records[start:end] if r.from_kernel]
    return Splat(kind, records[title].text, "\n".join(lines), records[title].seq)


def _report_end(records: Sequence[KmsgRecord], start: int, *, stop_at_next: bool) -> int:
    """Index after the last record of the report opened at ``start``: the end-trace
    line, the cap, or (``stop_at_next``) the record before the next splat."""
    stop = min(len(records), start + 1 + MAX_LINES)
    for j in range(start + 1, stop):
        if _END.search(records[j].text):
            return j + 1
        if stop_at_next and (splat_kind(records[j]) is not None
                             or _CUT_HERE.search(records[j].text)):
            return j
    return stop
