"""Unplug's retry while QEMU still holds a backend: the QMP side replaced by a script.

The real unplug (device_del → DEVICE_DELETED → blockdev-del on a booted guest) is
tests/integration/test_hotplug.py; this pins down which refusals are waited out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_virtio.errors import LaunchError
from pytest_virtio.guest import Guest


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


def _guest(machine: ScriptedQmp, tmp_path: Path) -> Guest:
    return Guest(machine=machine, name="g", accel="tcg", timeout_scale=1.0,  # type: ignore[arg-type]
                 run_dir=tmp_path)


@pytest.mark.parametrize("refusal", [
    "QMP blockdev-del failed: Node drv-a is in use",
    "QMP chardev-remove failed: Chardev 'vu-a' is busy",
])
def test_a_still_held_backend_is_retried_until_released(tmp_path: Path, refusal: str) -> None:
    machine = ScriptedQmp([LaunchError(refusal), LaunchError(refusal), None])
    _guest(machine, tmp_path)._qmp_once_released(5.0, "blockdev-del", **{"node-name": "drv-a"})
    assert len(machine.calls) == 3


def test_other_qmp_errors_are_not_retried(tmp_path: Path) -> None:
    machine = ScriptedQmp([LaunchError("QMP blockdev-del failed: Cannot find node drv-a")])
    with pytest.raises(LaunchError, match="Cannot find node"):
        _guest(machine, tmp_path)._qmp_once_released(5.0, "blockdev-del")
    assert len(machine.calls) == 1


def test_a_backend_held_past_the_timeout_fails_with_qemus_words(tmp_path: Path) -> None:
    machine = ScriptedQmp([LaunchError("Node drv-a is in use")] * 1000)
    with pytest.raises(LaunchError, match="is in use"):
        _guest(machine, tmp_path)._qmp_once_released(0.2, "blockdev-del")
    assert 2 <= len(machine.calls) < 1000
