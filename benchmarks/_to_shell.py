"""The one timing every boot benchmark shares: fixture request → shell answering.

A guest is asked of the session, one command (``true``) proves the shell
answers, the wall time to that answer is taken, ``inspect`` reads whatever else
the benchmark wants from the live guest, and the guest is closed and forgotten
(so a long run holds one guest at a time).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from pytest_virtio import spec
from pytest_virtio.guests.guest import Guest
from pytest_virtio.guests.session import VirtioSession

T = TypeVar("T")


def to_shell(session: VirtioSession, shape: spec.MachineSpec,
             inspect: Callable[[Guest, float], T]) -> T:
    """``inspect(guest, wall seconds to the shell)`` of one new guest of ``shape``."""
    start = time.monotonic()
    guest = session.boot(shape)
    try:
        guest.check("true")
        return inspect(guest, time.monotonic() - start)
    finally:
        guest.close()
        session.guests.clear()


def wall(_guest: Guest, seconds: float) -> float:
    return seconds
