"""The guest kernel's log, read record by record from ``/dev/kmsg``.

Why /dev/kmsg and not the console: the guest's init keeps the console quiet
(``dmesg -n 1``), so a WARNING never reaches ttyS0; and why not ``dmesg``: only
/dev/kmsg gives each record its sequence number, so a reader can ask for what is
new since its last read, whatever the ring buffer did in between, and a shared
guest's records are attributed to the test during which they were logged.

Record format (Documentation/ABI/testing/dev-kmsg)::

    <prio>,<seq>,<usec>,<flags>[,...];<message>
     KEY=value            (continuation lines: dropped by the guest-side filter)

``prio`` is ``facility << 3 | level``; the kernel's own records have facility 0,
a line a user wrote into /dev/kmsg has facility 1 (user) and can never pass for
a kernel splat.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["KmsgRecord", "new_records_shell", "parse_records"]

_HEADER = re.compile(r"(\d+),(\d+),(\d+),[^;]*;")


@dataclass(frozen=True)
class KmsgRecord:
    """One record of the kernel's log."""

    seq: int
    facility: int
    level: int
    usec: int
    text: str

    @property
    def from_kernel(self) -> bool:
        """Logged by the kernel itself (facility 0), not written by a user program."""
        return self.facility == 0

    def line(self) -> str:
        """As ``dmesg`` prints it: ``[seconds] text``."""
        return f"[{self.usec / 1e6:12.6f}] {self.text}"


def new_records_shell(after_seq: int, source: str = "/dev/kmsg") -> str:
    """A guest shell line printing the records after ``after_seq``, one per line.

    /dev/kmsg opened without O_NONBLOCK would wait for the next record; with it, the
    last read fails with EAGAIN and GNU dd stops there (its complaint goes to
    /dev/null).  Each read() returns exactly one record.  The awk filter runs in
    the guest so only new records cross the channel: a whole boot log is ~60 KB,
    half a second on the serial line, per test.
    """
    if after_seq < -1:
        raise ValueError(f"after_seq must be >= -1, got {after_seq}")
    return (f"dd if={shlex.quote(source)} iflag=nonblock bs=65536 status=none 2>/dev/null | "
            f"awk -v s={after_seq} "
            "'substr($0, 1, 1) == \" \" { next } "
            "{ split($0, h, \";\"); split(h[1], f, \",\"); if (f[2] + 0 > s) print }'")


def parse_records(text: str) -> list[KmsgRecord]:
    """Records from the guest-side filter's output; lines that are not records are skipped
    (a continuation line the filter kept, or noise), never guessed at."""
    return list(_parse(text.splitlines()))


def _parse(lines: Iterable[str]) -> Iterable[KmsgRecord]:
    for line in lines:
        match = _HEADER.match(line)
        if match is None:
            continue
        prio, seq, usec = (int(g) for g in match.groups())
        yield KmsgRecord(seq=seq, facility=prio >> 3, level=prio & 7, usec=usec,
                         text=line[match.end():])
