"""A guest command on a guest with in-process disks: backend failures end it at once,
and a timeout leaves each backend's queue state behind (issue 16, items 1 and 5).

The console is the real Console over socketpairs whose far ends (the "guest")
never answers; the backend is a real, unconnected VhostUserBlkServer.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_virtio.channels.console import Console
from pytest_virtio.errors import GuestTimeout
from pytest_virtio.guests.guest import Guest
from pytest_virtio.qemu.machine import RunState
from pytest_virtio.vhost_user import MemoryStorage, VhostUserBlkServer
from pytest_virtio.vhost_user.virtqueue import QueueBroken


class _Machine:
    """The part of a Machine that Guest.run uses: its console, and QMP events
    with no STOP among them (runstate.check_running looks before every command)."""

    state = RunState.RUNNING

    def __init__(self, console: Console) -> None:
        self.console = console
        self.events: list[dict[str, object]] = []

    def poll_events(self) -> list[dict[str, object]]:
        return []


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Guest, VhostUserBlkServer, socket.socket]]:
    kernel, kernel_end = socket.socketpair()
    ours, guest_end = socket.socketpair()
    server = VhostUserBlkServer(str(tmp_path / "vu.sock"), MemoryStorage(4096), name="data")
    console = Console(kernel, ours, tmp_path / "console.log")
    guest = Guest(machine=_Machine(console),  # type: ignore[arg-type]
                  name="g", accel="tcg", timeout_scale=1.0, run_dir=tmp_path,
                  backends={"data": server})
    yield guest, server, guest_end
    for sock in (kernel, kernel_end, ours, guest_end):
        sock.close()


def test_a_broken_queue_fails_the_running_command_at_once(
        rig: tuple[Guest, VhostUserBlkServer, socket.socket]) -> None:
    guest, server, guest_end = rig
    fail = threading.Timer(0.3, lambda: server.errors.append(
        QueueBroken("vhost-user-blk disk 'data': queue 0 is broken: head 99 out of range")))
    fail.start()
    start = time.monotonic()
    with pytest.raises(QueueBroken, match="disk 'data': queue 0 is broken: head 99"):
        guest.run("fio --name=x", timeout=60)
    assert time.monotonic() - start < 10, "waited for the command timeout"
    time.sleep(0.1)
    assert b"\x03" in guest_end.recv(65536), "the stuck command was not interrupted"
    server.clear_errors()


def test_a_timeout_keeps_every_backends_queue_state_and_names_it(
        rig: tuple[Guest, VhostUserBlkServer, socket.socket]) -> None:
    guest, _, _ = rig
    with pytest.raises(GuestTimeout) as info:
        guest.run("fio --name=x", timeout=0.5)
    assert any("vhost-state-data.json" in note for note in info.value.__notes__)
    state = json.loads((guest.run_dir / "vhost-state-data.json").read_text())
    assert state["disk"] == "data"
    assert {"queues", "stats", "errors", "recent_messages"} <= set(state)
    assert "idle_rechecks_found_work" in state["stats"]
