"""The one shape every way of running a guest command has: ``run(cmd, timeout, watch)``.

The framed console (:class:`~.console.Console`), SSH (:class:`~.ssh.SshSession`)
and the guest agent (:class:`~.agent.GuestAgent`) each implement it, so
``Guest.run(via=...)`` picks one and treats them alike: ``sh`` semantics, stdin
empty, 128+N for a command killed by signal N, ``watch`` may end the wait.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pytest_virtio.errors import CommandFailed

__all__ = ["VIAS", "Result", "Runner"]

#: ``Guest.run(via=...)`` choices.
VIAS = ("console", "ssh", "agent")


@dataclass(frozen=True, slots=True)
class Result:
    """What one guest command did; the same shape for console, SSH and the agent.

    The streams are kept as the exact bytes the command wrote (CR, NUL and
    invalid UTF-8 included); ``stdout``/``stderr`` are their text, with U+FFFD
    for what is not UTF-8.
    """

    cmd: str
    rc: int
    stdout_bytes: bytes
    stderr_bytes: bytes = b""
    duration: float = 0.0
    via: str = "console"

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def output(self) -> str:
        """stdout then stderr, for messages and quick asserts."""
        return self.stdout + self.stderr

    def check(self, console_tail: str = "") -> Result:
        """Return self, or raise CommandFailed carrying the output."""
        if self.rc != 0:
            raise CommandFailed(
                f"guest command failed (exit {self.rc}, via {self.via}): {self.cmd}\n"
                + _section("stdout", self.stdout) + _section("stderr", self.stderr),
                console_tail,
            )
        return self


class Runner(Protocol):
    def run(self, cmd: str, timeout: float,
            watch: Callable[[], None] | None = None) -> Result: ...


def _section(title: str, text: str) -> str:
    if not text:
        return f"--- {title}: (empty) ---\n"
    return f"--- {title} ---\n{text}" + ("" if text.endswith("\n") else "\n")
