"""Unplug's retry while QEMU still holds a backend: the QMP side replaced by a script.

The real unplug (device_del → DEVICE_DELETED → blockdev-del on a booted guest) is
tests/integration/test_hotplug.py; this pins down which refusals are waited out.
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from pytest_virtio.errors import LaunchError, QmpError
from pytest_virtio.guests import hotplug
from pytest_virtio.qemu.machine import Machine


class ScriptedQmp:
    """Answers QMP commands from a list: an exception to raise, or None for success."""

    def __init__(self, answers: list[Exception | None]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def qmp(self, cmd: str, **args: Any) -> None:
        self.calls.append((cmd, args))
        answer = self.answers.pop(0)
        if answer is not None:
            raise answer


def _release(machine: ScriptedQmp, timeout: float, cmd: str, **args: Any) -> None:
    hotplug.qmp_once_released(cast(Machine, machine), timeout, cmd, **args)


def _refused(command: str, desc: str) -> QmpError:
    return QmpError(command, None, "GenericError", desc)


@pytest.mark.parametrize("refusal", [
    _refused("blockdev-del", "Node drv-a is in use"),
    _refused("chardev-remove", "Chardev 'vu-a' is busy"),
])
def test_a_still_held_backend_is_retried_until_released(refusal: QmpError) -> None:
    machine = ScriptedQmp([refusal, refusal, None])
    _release(machine, 5.0, "blockdev-del", **{"node-name": "drv-a"})
    assert len(machine.calls) == 3


def test_other_qmp_errors_are_not_retried() -> None:
    machine = ScriptedQmp([_refused("blockdev-del", "Cannot find node drv-a")])
    with pytest.raises(QmpError, match="Cannot find node"):
        _release(machine, 5.0, "blockdev-del")
    assert len(machine.calls) == 1


def test_a_backend_held_past_the_timeout_fails_with_qemus_words() -> None:
    machine = ScriptedQmp([_refused("blockdev-del", "Node drv-a is in use")] * 1000)
    with pytest.raises(QmpError, match="is in use"):
        _release(machine, 0.2, "blockdev-del")
    assert 2 <= len(machine.calls) < 1000


def test_qemu_gone_is_not_mistaken_for_a_busy_backend() -> None:
    """A LaunchError that is not QEMU's reply (the socket died) whose text happens to
    say "in use" is raised at once: only a QMP error reply is waited out."""
    machine = ScriptedQmp([LaunchError("QMP socket closed while a disk was in use")])
    with pytest.raises(LaunchError, match="socket closed"):
        _release(machine, 5.0, "blockdev-del")
    assert len(machine.calls) == 1
