"""The one thing most of a guest's rooms need from it: a way to run commands.

A :class:`~pytest_virtio.guests.guest.Guest` is a :class:`Shell`; a room
(:mod:`.drivers`, :mod:`.hotplug`, :mod:`.media`, :mod:`.power`, :mod:`.ports`)
takes one and the Machine, not the whole guest, so it is tested with a scripted
shell and the guest stays a thin face over them.
"""

from __future__ import annotations

from typing import Protocol

from pytest_virtio.channels.runners import Result

__all__ = ["Shell"]


class Shell(Protocol):
    """Runs commands in a guest (``run`` never raises on a non-zero exit, ``check`` does)."""

    def run(self, cmd: str, timeout: float | None = None, via: str = "console") -> Result: ...

    def check(self, cmd: str, timeout: float | None = None, via: str = "console") -> Result: ...

    def console_tail(self, lines: int = 40) -> str: ...
