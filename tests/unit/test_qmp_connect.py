"""QMP connect against a socket that exists but does not listen yet (QEMU between
bind() and listen()): qemu.qmp's error must be recognised as a refusal to retry."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from pytest_virtio.qemu.machine import _refused, connect_qmp


def test_bound_but_not_listening_socket_is_a_refusal(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))  # no listen(): what QEMU's socket is for a moment
    qmp = QEMUMonitorProtocol(str(path))
    try:
        with pytest.raises(Exception) as info:
            qmp.connect(negotiate=True)
        assert _refused(info.value)
    finally:
        qmp.close()
        sock.close()


def test_other_failures_are_not_refusals() -> None:
    eof = EOFError("QEMU closed the socket")
    wrapped = RuntimeError("handshake failed")
    wrapped.__cause__ = eof
    assert not _refused(wrapped)
    assert not _refused(None)
    loop = RuntimeError("a")
    loop.__context__ = loop  # a cycle must not hang
    assert not _refused(loop)


def test_connect_retries_a_refusal_only_while_qemu_lives(tmp_path: Path) -> None:
    """The one retry loop Machine and the argv tests share: a refusal is retried
    while ``exited()`` says QEMU runs, and raised once it has exited."""
    path = tmp_path / "qmp.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    asked: list[int] = []

    def exited() -> bool:
        asked.append(1)
        return len(asked) >= 5

    try:
        with pytest.raises(Exception) as info:
            connect_qmp(str(path), 30.0, exited)
        assert _refused(info.value)
        assert len(asked) == 5
        # With no time left, a refusal is raised at once.
        with pytest.raises(Exception) as info:
            connect_qmp(str(path), 0.0, lambda: False)
        assert _refused(info.value)
    finally:
        sock.close()
