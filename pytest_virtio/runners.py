"""The one shape every way of running a guest command has: ``run(cmd, timeout, watch)``.

The framed console (:class:`~.console.Console`), SSH (:class:`~.ssh.SshSession`)
and the guest agent (:class:`~.agent.GuestAgent`) each implement it, so
``Guest.run(via=...)`` picks one and treats them alike: ``sh`` semantics, stdin
empty, 128+N for a command killed by signal N, ``watch`` may end the wait.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .console import Result

__all__ = ["VIAS", "Runner"]

#: ``Guest.run(via=...)`` choices.
VIAS = ("console", "ssh", "agent")


class Runner(Protocol):
    def run(self, cmd: str, timeout: float,
            watch: Callable[[], None] | None = None) -> Result: ...
