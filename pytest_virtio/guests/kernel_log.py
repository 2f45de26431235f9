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
        #: The kernel the cursor belongs to: a reset guest restarts its sequence numbers.
        self.boot_id = ""

    def new_records(self, timeout: float | None = None) -> list[KmsgRecord]:
        """Every record logged since the last call (the first call: since boot).

        A first look that finds no record at all cannot be right (a booted kernel
        has logged hundreds): it is tried once more (a flood can overrun /dev/kmsg's
        reader, whose read then fails with EPIPE and ends dd), then the guest cannot
        read /dev/kmsg the way we ask (no GNU dd, or no awk), which is said rather
        than passed off as "no splats".  A gap in sequence numbers (the ring
        buffer wrapped between looks) is logged with its size.
        """
        boot_id, records = self._look(timeout)
        if boot_id != self.boot_id and self.seq >= 0:
            log.info("kernel log: the guest rebooted (boot id %s): reading from its start",
                     boot_id)
            self.seq = -1
            boot_id, records = self._look(timeout)
        if self.seq < 0 and not records:
            boot_id, records = self._look(timeout)
            if not records:
                raise GuestError("cannot read the guest kernel's log from /dev/kmsg (the "
                                 "image needs GNU dd and awk): kernel splats cannot be "
                                 "checked", self._shell.console_tail())
        if records and self.seq >= 0 and records[0].seq > self.seq + 1:
            log.warning("kernel log: %d record(s) lost before seq %d (the ring buffer "
                        "wrapped between looks)", records[0].seq - self.seq - 1, records[0].seq)
        self.boot_id = boot_id
        if records:
            self.seq = max(r.seq for r in records)
        return records

    def _look(self, timeout: float | None) -> tuple[str, list[KmsgRecord]]:
        result = self._shell.run("cat /proc/sys/kernel/random/boot_id; "
                                 + new_records_shell(self.seq), timeout)
        boot_id, _, rest = result.stdout.partition("\n")
        return boot_id.strip(), parse_records(rest)

    def new_splats(self, timeout: float | None = None) -> list[Splat]:
        """The splats among :meth:`new_records`."""
        splats = find_splats(self.new_records(timeout))
        for splat in splats:
            log.warning("kernel splat (%s): %s", splat.kind, splat.title)
        return splats
