"""A guest shell for room tests: commands answered from a table, none run."""

from __future__ import annotations

from collections.abc import Callable

from pytest_virtio.channels.runners import Result


class ScriptedShell:
    """A guest shell: each command answered by the first table entry it contains."""

    def __init__(self, answers: dict[str, str | Callable[[], str]] | None = None,
                 tail: str = "", rc: int = 0) -> None:
        self.answers = answers or {}
        self.tail = tail
        self.rc = rc
        self.commands: list[str] = []

    def run(self, cmd: str, timeout: float | None = None, via: str = "console") -> Result:
        self.commands.append(cmd)
        out = next((a for key, a in self.answers.items() if key in cmd), "")
        text = out() if callable(out) else out
        return Result(cmd, self.rc, text.encode())

    def check(self, cmd: str, timeout: float | None = None, via: str = "console") -> Result:
        return self.run(cmd, timeout, via).check(self.tail)

    def console_tail(self, lines: int = 40) -> str:
        return self.tail
