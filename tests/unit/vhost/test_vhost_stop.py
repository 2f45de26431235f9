"""stop() on a backend whose thread is stuck: an error saying where, and no fd left open.

The thread is held inside a real request (a storage write that waits on an
event), exactly where a slow or wedged medium would hold it.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Iterator, Sequence

import pytest

from pytest_virtio.errors import BackendError
from pytest_virtio.vhost_user import BlkType, MemoryStorage, VhostUserBlkServer
from pytest_virtio.vhost_user.testing import MockFrontend, MockMemory, MockSplitQueue


class HeldStorage(MemoryStorage):
    """A RAM disk whose writes wait until the test lets them go."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.entered = threading.Event()
        self.release = threading.Event()

    def writev(self, offset: int, bufs: Sequence[memoryview]) -> int:
        self.entered.set()
        self.release.wait(30)
        return super().writev(offset, bufs)


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vus", dir="/tmp")
    yield os.path.join(d, "vu.sock")
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


def test_stop_timing_out_names_the_place_and_closes_its_fds(sock_path: str) -> None:
    storage = HeldStorage(1 << 20)
    server = VhostUserBlkServer(sock_path, storage).start()
    mem = MockMemory(4 << 20)
    fe = MockFrontend(server.socket_path)
    try:
        features, _ = fe.realize()
        q = MockSplitQueue(mem, 64, base=0x10000, data_base=0x100000)
        fe.start(mem, [q], features)
        server.wait_running(5)
        selector_fd = server._sel.fileno() if server._sel else -1
        wake_fd = server._wake_fd

        q.publish(q.blk_request(BlkType.OUT, 0, b"x" * 512).head)
        fe.kick()
        assert storage.entered.wait(5), "the write never reached the storage"
        with pytest.raises(BackendError, match=r"did not stop within 0\.2s; it is in .*"
                                               r"writev \(test_vhost_stop\.py:\d+\)"):
            server.stop(timeout=0.2)

        # What stop() owns is closed although the thread still runs.
        assert server._sel is None and server._listener is None and server._wake_fd == -1
        assert not os.path.exists(sock_path)
        for fd in (selector_fd, wake_fd):
            with pytest.raises(OSError):
                os.fstat(fd)
        with pytest.raises(OSError), socket.socket(socket.AF_UNIX) as probe:
            probe.connect(sock_path)

        # Let the request finish: the thread sees it is stopping and drops the rest.
        storage.release.set()
        server.stop(timeout=5)
        assert server._thread is None
        assert not server.connected
        server.check()
    finally:
        storage.release.set()
        fe.close()
        server.stop(timeout=5)
        mem.close()
