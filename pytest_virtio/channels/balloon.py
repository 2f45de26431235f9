"""virtio-balloon from the host: resize the guest and read its memory statistics.

Why a wait in ``resize``: QMP ``balloon`` only records the wish; the guest
driver then inflates or deflates page by page (virtio 1.2 §5.5.6), which takes
seconds under TCG. A test asserting on guest memory right after the command
would race the driver, so ``resize`` polls ``query-balloon`` until the guest's
``actual`` equals the target and, on timeout, says where the guest got to.

Statistics (§5.5.6.3) flow only when the host asks for them periodically:
``guest-stats-polling-interval`` on the device's QOM object; the newest values
are in its ``guest-stats`` property with the guest's ``last-update`` time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pytest_virtio.errors import GuestTimeout, QmpError

__all__ = ["BalloonStats", "resize", "stats"]

Qmp = Callable[..., Any]
_POLL = 0.2
_MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class BalloonStats:
    """One report of the guest's balloon driver; a field is None when the guest
    did not report it (QEMU gives -1).

    Field names are QEMU's ``stat-*`` keys without the prefix, '-' as '_'.
    """

    last_update: int
    free_memory: int | None
    total_memory: int | None
    available_memory: int | None
    disk_caches: int | None
    swap_in: int | None
    swap_out: int | None
    major_faults: int | None
    minor_faults: int | None
    #: Everything QEMU returned, by its own key names (newer QEMUs add keys).
    raw: Mapping[str, int]

    @classmethod
    def from_qom(cls, reply: Mapping[str, Any]) -> BalloonStats:
        raw = {str(k): int(v) for k, v in reply.get("stats", {}).items()}

        def get(key: str) -> int | None:
            value = raw.get(f"stat-{key.replace('_', '-')}", -1)
            return None if value < 0 else value

        return cls(
            last_update=int(reply.get("last-update", 0)),
            free_memory=get("free_memory"), total_memory=get("total_memory"),
            available_memory=get("available_memory"), disk_caches=get("disk_caches"),
            swap_in=get("swap_in"), swap_out=get("swap_out"),
            major_faults=get("major_faults"), minor_faults=get("minor_faults"),
            raw=MappingProxyType(raw),
        )


def actual(qmp: Qmp) -> int:
    """The guest's current size in bytes as the balloon sees it (``query-balloon``)."""
    return int(qmp("query-balloon")["actual"])


def resize(qmp: Qmp, target: int, timeout: float, console_tail: Callable[[], str]) -> int:
    """Ask for ``target`` bytes and wait until the guest reaches it; returns ``actual``."""
    qmp("balloon", value=target)
    deadline = time.monotonic() + timeout
    while True:
        now = actual(qmp)
        if now == target:
            return now
        if time.monotonic() > deadline:
            raise GuestTimeout(
                f"balloon: guest reached {now // _MIB} MiB ({now} bytes), not the target "
                f"{target // _MIB} MiB, within {timeout:.0f}s", console_tail())
        time.sleep(_POLL)


def stats(qmp: Qmp, device: str, timeout: float, interval: int = 1) -> BalloonStats:
    """A fresh statistics report: start polling every ``interval`` s, wait for a newer one.

    ``last-update`` is the guest's report time; a report older than the request
    could predate what the test just did, so this waits for one newer than it.
    """
    path = f"/machine/peripheral/{device}"
    before = _read(qmp, path)
    qmp("qom-set", path=path, property="guest-stats-polling-interval", value=interval)
    deadline = time.monotonic() + timeout
    while True:
        report = _read(qmp, path)
        if report is not None and (before is None or report.last_update > before.last_update):
            return report
        if time.monotonic() > deadline:
            raise GuestTimeout(f"balloon {device!r}: no statistics report from the guest "
                               f"within {timeout:.0f}s (virtio_balloon loaded?)")
        time.sleep(_POLL)


def _read(qmp: Qmp, path: str) -> BalloonStats | None:
    """The device's last report, None before the guest sent any."""
    try:
        return BalloonStats.from_qom(qmp("qom-get", path=path, property="guest-stats"))
    except QmpError as exc:
        if "hasn't updated" in exc.desc:  # QEMU: "guest hasn't updated any stats yet"
            return None
        raise
