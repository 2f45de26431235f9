"""A guest's kernel log as a cursor: what the kernel logged since the last look.

The plugin looks once at the end of every test that used the guest, so a splat
(:mod:`pytest_virtio.channels.splats`) is charged to the test during which it was
logged, also on a guest shared by a module; a test may look itself
(``guest.kernel_log.new_splats()``), which moves the cursor the same way.
"""

from __future__ import annotations

import logging

from pytest_virtio.channels.kmsg import KmsgRecord, new_records_shell, parse_records
from pytest_virtio.channels.splats import Splat, find_splats
from pytest_virtio.errors import GuestError
from pytest_virtio.guests.shell import Shell

__all__ = ["KernelLog"]

log = logging.getLogger(__name__)


class KernelLog:
    """The records after ``seq`` (the last one seen; -1 before the first look)."""

    def __init__(self, shell: Shell) -> None:
        self._shell = shell
        self.seq = -1

    def new_records(self) -> list[KmsgRecord]:
        """Every record logged since the last call (the first call: since boot).

        A first look that finds no record at all cannot be right (a booted kernel
        has logged hundreds): the guest cannot read /dev/kmsg the way we ask (no
        GNU dd, or no awk), and saying so beats a silent "no splats".
        """
        first = self.seq < 0
        result = self._shell.run(new_records_shell(self.seq))
        records = parse_records(result.stdout)
        if first and not records:
            raise GuestError("cannot read the guest kernel's log from /dev/kmsg (the image "
                             "needs GNU dd and awk): kernel splats cannot be checked; "
                             f"rc {result.rc}, stderr {result.stderr[-200:]!r}",
                             self._shell.console_tail())
        if records:
            self.seq = max(r.seq for r in records)
        return records

    def new_splats(self) -> list[Splat]:
        """The splats among :meth:`new_records`."""
        splats = find_splats(self.new_records())
        for splat in splats:
            log.warning("kernel splat (%s): %s", splat.kind, splat.title)
        return splats
