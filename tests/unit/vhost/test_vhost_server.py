"""The server over a real unix socket; the test plays QEMU with real fds and a real memfd."""

from __future__ import annotations

import os
import select
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from pytest_virtio.errors import BackendError, ProtocolError
from pytest_virtio.vhost_user import BlkType, MemoryStorage, VhostUserBlkServer
from pytest_virtio.vhost_user import protocol as p
from pytest_virtio.vhost_user.protocol import ProtocolFeature, Request, TransportFeature
from pytest_virtio.vhost_user.testing import MockFrontend, MockMemory, MockSplitQueue


def _wait_for(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def sock_path() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="vut", dir="/tmp")
    yield os.path.join(d, "vu.sock")
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


@pytest.fixture
def server(sock_path: str) -> Iterator[VhostUserBlkServer]:
    storage = MemoryStorage(1 << 20)
    srv = VhostUserBlkServer(sock_path, storage, num_queues=2, serial="srv-test")
    srv.start()
    yield srv
    srv.stop()
    assert srv._thread is None
    assert not os.path.exists(sock_path)


@pytest.fixture
def mem() -> Iterator[MockMemory]:
    m = MockMemory(4 << 20, layout=[(0, 1 << 20), (1 << 20, 3 << 20)])
    yield m
    m.close()


def _started(server: VhostUserBlkServer, mem: MockMemory, nq: int = 1
             ) -> tuple[MockFrontend, list[MockSplitQueue]]:
    fe = MockFrontend(server.socket_path)
    features, _ = fe.realize()
    queues = [MockSplitQueue(mem, 64, base=0x10000 + i * 0x10000,
                             data_base=0x100000 + i * 0x80000) for i in range(nq)]
    fe.start(mem, queues, features)
    server.wait_running(5)
    return fe, queues


def test_realize_values(server: VhostUserBlkServer) -> None:
    with MockFrontend(server.socket_path) as fe:
        features, pf = fe.realize()
        assert features & TransportFeature.PROTOCOL_FEATURES
        assert features & TransportFeature.VERSION_1
        assert pf & ProtocolFeature.CONFIG and pf & ProtocolFeature.MQ
        assert not pf & ProtocolFeature.STATUS and not pf & ProtocolFeature.CONFIGURE_MEM_SLOTS
        assert fe.get_u64(Request.GET_QUEUE_NUM) == 2
        body = fe.call(Request.GET_CONFIG, p.CONFIG_HDR.pack(0, 57, 0) + bytes(57))
        cfg = p.decode_config(body)
        assert cfg.size == 57 and len(cfg.data) == 57  # exactly the size asked
        assert int.from_bytes(cfg.data[:8], "little") == (1 << 20) // 512
        assert fe.ack(Request.SET_OWNER) == 0  # REPLY_ACK
        assert server.connected
    server.check()


def test_io_round_trip_with_kick_and_call(server: VhostUserBlkServer, mem: MockMemory) -> None:
    fe, (q,) = _started(server, mem)
    with fe:
        w = q.blk_request(BlkType.OUT, 3, b"Q" * 4096, indirect=True)
        q.publish(w.head)
        fe.kick()
        assert fe.wait_call() >= 1
        assert q.take_used() == [(w.head, 1)] and q.status(w) == 0
        r = q.blk_request(BlkType.IN, 3, 4096)
        q.publish(r.head)
        fe.kick()
        fe.wait_call()
        assert q.take_used() == [(r.head, 4097)]
        assert q.data(r) == b"Q" * 4096
        # stop: GET_VRING_BASE reports last_avail and the ring no longer serves
        fe.send(Request.SET_VRING_ENABLE, p.VRING_STATE.pack(0, 0))
        assert fe.get_vring_base(0) == 2
        q.publish(q.blk_request(BlkType.IN, 0, 512).head)
        fe.kick()
        time.sleep(0.1)
        assert q.take_used() == []
    _wait_for(lambda: not server.connected)
    assert server.stats.to_dict()["requests"] == {"OUT": 1, "IN": 1}
    server.check()


def test_multiqueue(server: VhostUserBlkServer, mem: MockMemory) -> None:
    fe, queues = _started(server, mem, nq=2)
    with fe:
        for i, q in enumerate(queues):
            r = q.blk_request(BlkType.GET_ID, 0, 20)
            q.publish(r.head)
            fe.kick(i)
            fe.wait_call(i)
            assert q.data(r).rstrip(b"\0") == b"srv-test"
    d = server.stats.to_dict()
    assert [qd["requests"] for qd in d["queues"]] == [{"GET_ID": 1}, {"GET_ID": 1}]
    server.check()


def test_set_mem_table_while_running(server: VhostUserBlkServer, mem: MockMemory) -> None:
    fe, (q,) = _started(server, mem)
    with fe:
        fe.set_mem_table(mem)  # QEMU re-sends the table whenever its memory map changes
        assert fe.ack(Request.SET_OWNER) == 0  # message processed
        r = q.blk_request(BlkType.IN, 0, 512)
        q.publish(r.head)
        fe.kick()
        fe.wait_call()
        assert q.take_used() == [(r.head, 513)]
    server.check()


def test_pending_requests_served_on_enable(server: VhostUserBlkServer, mem: MockMemory) -> None:
    fe = MockFrontend(server.socket_path)
    with fe:
        features, _ = fe.realize()
        q = MockSplitQueue(mem, 64)
        r = q.blk_request(BlkType.IN, 0, 512)
        q.publish(r.head)  # queued before the device is started; no kick
        fe.start(mem, [q], features)
        fe.wait_call()
        assert q.take_used() == [(r.head, 513)]


def test_without_protocol_features_ring_starts_enabled(
    server: VhostUserBlkServer, mem: MockMemory
) -> None:
    with MockFrontend(server.socket_path) as fe:
        features = fe.get_u64(Request.GET_FEATURES) & ~TransportFeature.PROTOCOL_FEATURES
        q = MockSplitQueue(mem, 64)
        fe.send(Request.SET_OWNER)
        fe.send(Request.SET_FEATURES, p.U64.pack(features))
        fe.set_mem_table(mem)
        kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        fe.send(Request.SET_VRING_NUM, p.VRING_STATE.pack(0, 64))
        fe.send(Request.SET_VRING_BASE, p.VRING_STATE.pack(0, 0))
        fe.send(Request.SET_VRING_ADDR, p.encode_vring_addr(q.vring_addr()))
        fe.send(Request.SET_VRING_CALL, p.U64.pack(0), [call])
        fe.send(Request.SET_VRING_KICK, p.U64.pack(0), [kick])
        server.wait_running(5)
        r = q.blk_request(BlkType.IN, 0, 512)
        q.publish(r.head)
        os.eventfd_write(kick, 1)
        assert select.select([call], [], [], 5)[0]
        assert q.take_used() == [(r.head, 513)]
        os.close(kick)
        os.close(call)


def test_eof_then_reconnect(server: VhostUserBlkServer, mem: MockMemory) -> None:
    fe, _ = _started(server, mem)
    fe.close()
    _wait_for(lambda: not server.connected)
    assert not server.running
    fe2, (q,) = _started(server, mem)
    with fe2:
        r = q.blk_request(BlkType.IN, 0, 512)
        q.publish(r.head)
        fe2.kick()
        fe2.wait_call()
    assert server.connections == 2
    server.check()


def test_stop_then_start_again_serves_a_new_front_end(
    server: VhostUserBlkServer, mem: MockMemory
) -> None:
    """A stopped server restarts on the same socket (QEMU's reconnect= redials it)."""
    fe, _ = _started(server, mem)
    server.stop()
    fe.close()
    assert not server.connected and not os.path.exists(server.socket_path)
    server.start()
    fe2, (q,) = _started(server, mem)
    with fe2:
        r = q.blk_request(BlkType.IN, 0, 512)
        q.publish(r.head)
        fe2.kick()
        fe2.wait_call()
    assert server.connections == 2
    server.check()


def test_second_concurrent_connection_is_refused(server: VhostUserBlkServer) -> None:
    with MockFrontend(server.socket_path) as fe:
        fe.get_u64(Request.GET_FEATURES)
        with MockFrontend(server.socket_path) as other, pytest.raises(
            (EOFError, ConnectionError)
        ):
            other.get_u64(Request.GET_FEATURES)
        assert fe.get_u64(Request.GET_QUEUE_NUM) == 2


def _nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_malformed_message_disconnects_and_is_reported(server: VhostUserBlkServer) -> None:
    with MockFrontend(server.socket_path) as fe:
        fe.send(Request.SET_FEATURES, b"\x00" * 3)  # wrong payload size
        with pytest.raises((EOFError, ConnectionError)):
            fe.get_u64(Request.GET_FEATURES)
    with pytest.raises(ProtocolError, match="SET_FEATURES payload"):
        server.check()
    assert len(server.clear_errors()) == 1
    with MockFrontend(server.socket_path) as fe:  # still accepting
        assert fe.get_u64(Request.GET_QUEUE_NUM) == 2
    server.check()


def test_wrong_fd_count_closes_fds(server: VhostUserBlkServer,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The fds of a refused message are closed before ``connected`` goes false.

    The count is also taken at the instant the server clears ``connected``: a
    test (or a fixture) that waits for the disconnect may rely on the fds being
    gone by then, and the old order (disconnect, then close) failed in CI.
    """
    at_disconnect: list[int] = []
    clear = server._connected.clear
    monkeypatch.setattr(server._connected, "clear",
                        lambda: (at_disconnect.append(_nfds()), clear())[1])
    with MockFrontend(server.socket_path) as fe:
        fe.get_u64(Request.GET_FEATURES)
        before = _nfds()
        extra = [os.eventfd(0) for _ in range(3)]
        with_ours = _nfds()  # ours stay open until the server has disconnected
        fe.send(Request.SET_VRING_CALL, p.U64.pack(0), extra)
        with pytest.raises((EOFError, ConnectionError)):
            fe.get_u64(Request.GET_FEATURES)
    _wait_for(lambda: not server.connected)
    for fd in extra:
        os.close(fd)
    assert _nfds() <= before
    # Then: our socket and our three still open, its connection closed, the three
    # copies it received closed (open, they would make it with_ours + 2).
    assert at_disconnect and at_disconnect[0] <= with_ours - 1
    assert isinstance(server.clear_errors()[0], ProtocolError)


def test_unexpected_fds_on_plain_request(server: VhostUserBlkServer) -> None:
    with MockFrontend(server.socket_path) as fe:
        fd = os.eventfd(0)
        fe.send(Request.GET_FEATURES, b"", [fd])
        os.close(fd)
        with pytest.raises((EOFError, ConnectionError)):
            fe.recv()
    assert "carried 1 fds" in str(server.clear_errors()[0])


def test_unknown_request_and_bad_queue_index(server: VhostUserBlkServer) -> None:
    with MockFrontend(server.socket_path) as fe:
        fe.send(200)
        with pytest.raises((EOFError, ConnectionError)):
            fe.recv()
    with MockFrontend(server.socket_path) as fe:
        fe.realize()
        assert fe.ack(Request.SET_VRING_NUM, p.VRING_STATE.pack(7, 64)) == 1  # failed ack
    errors = [str(e) for e in server.clear_errors()]
    assert "unknown vhost-user request 200" in errors[0]
    assert "queue index 7" in errors[1]


def test_unoffered_features_rejected(server: VhostUserBlkServer) -> None:
    with MockFrontend(server.socket_path) as fe:
        fe.send(Request.SET_FEATURES, p.U64.pack(TransportFeature.RING_PACKED))
        with pytest.raises((EOFError, ConnectionError)):
            fe.recv()
    assert "never offered" in str(server.clear_errors()[0])


def test_break_queue_signals_err_eventfd(server: VhostUserBlkServer, mem: MockMemory) -> None:
    fe, _ = _started(server, mem)
    with fe:
        server.faults.break_queue(0)
        assert select.select([fe.queue_fds[0].err], [], [], 5)[0]
        assert fe.err_count() == 1
        assert "fault injection" in server.broken_queues()[0]
        with pytest.raises(BackendError):
            server.faults.break_queue(5)
    server.check()  # a broken queue is not a backend failure


def test_inflight_fd(server: VhostUserBlkServer) -> None:
    with MockFrontend(server.socket_path) as fe:
        fe.realize()
        fe.send(Request.GET_INFLIGHT_FD, p.encode_inflight(p.Inflight(0, 0, 2, 128)))
        req, flags, body, fds = fe.recv()
        assert req == Request.GET_INFLIGHT_FD and flags == 5 and len(fds) == 1
        inf = p.decode_inflight(body)
        assert inf.mmap_size >= 2 * (16 + 16 * 128) and os.fstat(fds[0]).st_size == inf.mmap_size
        assert fe.ack(Request.SET_INFLIGHT_FD, body, [fds[0]]) == 0
        os.close(fds[0])
    server.check()


def test_reset_device(server: VhostUserBlkServer, mem: MockMemory) -> None:
    fe, _ = _started(server, mem)
    with fe:
        assert fe.ack(Request.RESET_DEVICE) == 0
        assert not server.running
    server.check()


def test_backend_bug_is_reraised_in_check(server: VhostUserBlkServer, mem: MockMemory) -> None:
    def broken_handler(*a: object) -> int:
        raise RuntimeError("bug in the device model")

    server.device.handle = broken_handler  # type: ignore[method-assign]
    fe, (q,) = _started(server, mem)
    with fe:
        q.publish(q.blk_request(BlkType.IN, 0, 512).head)
        fe.kick()
        _wait_for(lambda: bool(server.errors))
    with pytest.raises(BackendError, match="bug in the device model"):
        server.check()
    server.clear_errors()


def test_wait_timeouts_and_double_start(sock_path: str) -> None:
    srv = VhostUserBlkServer(sock_path, MemoryStorage(4096))
    with srv:
        with pytest.raises(BackendError, match="did not connect"):
            srv.wait_connected(0.1)
        with pytest.raises(BackendError, match="already started"):
            srv.start()
    srv.stop()  # idempotent


def test_constructor_validation(sock_path: str) -> None:
    with pytest.raises(ValueError):
        VhostUserBlkServer(sock_path, MemoryStorage(4096), num_queues=0)
    with pytest.raises(ValueError):
        VhostUserBlkServer(sock_path, MemoryStorage(4096), queue_size_max=1000)


# --- stop() on a backend whose thread is stuck: an error saying where, no fd left open.
# The thread is held inside a real request (a storage write waiting on an event),
# exactly where a slow or wedged medium would hold it.


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
                                               r"writev \(test_vhost_server\.py:\d+\)"):
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


def test_backend_logs_its_trail(server: VhostUserBlkServer,
                                caplog: pytest.LogCaptureFixture) -> None:
    """Connects, messages and disconnects land in pytest's captured log (the backend thread's
    records too), so a failed test's report shows what the front-end did."""
    caplog.set_level("DEBUG", logger="pytest_virtio.vhost_user.server")
    with MockFrontend(server.socket_path) as fe:
        fe.realize()
        _wait_for(lambda: server.connected)
    _wait_for(lambda: not server.connected)
    text = caplog.text
    assert f"vhost-user-blk {server.name!r}: front-end connected (connection 1)" in text
    assert "<- GET_FEATURES" in text
    _wait_for(lambda: "front-end disconnected" in caplog.text)
