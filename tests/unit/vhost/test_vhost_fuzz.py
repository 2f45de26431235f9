"""Property tests: random messages and random rings never escape as anything but
ProtocolError, never crash the process, and never touch memory outside the map."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_virtio.errors import ProtocolError
from pytest_virtio.vhost_user import protocol as p
from pytest_virtio.vhost_user.blk import BlkDevice, MemoryStorage
from pytest_virtio.vhost_user.memory import GuestMemory
from pytest_virtio.vhost_user.server import VhostUserBlkServer
from pytest_virtio.vhost_user.stats import Stats
from pytest_virtio.vhost_user.testing import MockFrontend, MockMemory, MockSplitQueue
from pytest_virtio.vhost_user.virtqueue import DESC, Virtqueue

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

_DECODERS = [p.decode_u64, p.decode_vring_state, p.decode_vring_addr, p.decode_vring_file,
             p.decode_mem_table, p.decode_config, p.decode_inflight]


@FUZZ
@given(request=st.integers(0, 60), flags=st.integers(0, 15), payload=st.binary(max_size=300),
       nfds=st.integers(0, 8))
def test_random_messages_only_raise_protocol_error(
    request: int, flags: int, payload: bytes, nfds: int
) -> None:
    try:
        h = p.decode_header(p.HEADER.pack(request, flags, len(payload)))
        req = p.request_of(h)
        p.check_payload_size(req, payload)
        p.check_fd_count(req, payload, nfds)
    except ProtocolError:
        pass
    for decode in _DECODERS:
        with contextlib.suppress(ProtocolError):
            decode(payload)  # type: ignore[operator]


GUARD = b"\xa5" * 4096
MiB = 1 << 20


def _ring_world() -> tuple[MockMemory, MockSplitQueue, GuestMemory]:
    # Three regions on one memfd; the backend maps only the first two, so the third
    # (a guard, at GPA 8 MiB) is RAM the "guest" could name but the backend never sees.
    mem = MockMemory(layout=[(0, MiB), (MiB, MiB), (8 * MiB, MiB)])
    q = MockSplitQueue(mem, 16, base=0x1000, data_base=0x8000)
    gm = GuestMemory(mem.regions[:2], [mem.fd, mem.fd])
    return mem, q, gm


descs = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 2 * MiB + 64), st.sampled_from([8 * MiB, 2**64 - 8]),
                  st.integers(0, 2**64 - 1)),
        st.one_of(st.integers(0, 9000), st.integers(0, 2**32 - 1)),
        st.integers(0, 7),
        st.integers(0, 20),
    ),
    min_size=16, max_size=16,
)


@FUZZ
@given(table=descs, indirect_table=descs, heads=st.lists(st.integers(0, 20), max_size=20),
       avail_idx=st.integers(0, 0xFFFF), headers=st.binary(min_size=64, max_size=64),
       event_idx=st.booleans())
def test_random_rings_never_escape(table: list[tuple[int, int, int, int]],
                                   indirect_table: list[tuple[int, int, int, int]],
                                   heads: list[int], avail_idx: int, headers: bytes,
                                   event_idx: bool) -> None:
    mem, q, gm = _ring_world()
    try:
        guard_off = mem.offset(8 * MiB)
        mem.mm[guard_off : guard_off + MiB] = GUARD * 256
        for i, d in enumerate(table):
            q.write_desc(i, *d)
        for i, d in enumerate(indirect_table):
            mem.write(0x4000 + 16 * i, DESC.pack(*d))
        mem.write(0x8000, headers)  # plausible blk headers where descriptors often point
        for slot, h in enumerate(heads):
            q.set_avail_slot(slot, h)
        q.set_avail_idx(avail_idx)
        storage = MemoryStorage(64 * 1024)
        dev = BlkDevice(storage, stats=Stats(1))
        vq = Virtqueue(0, 16, Stats(1))
        vq.set_num(16)
        vq.indirect = True
        vq.event_idx = event_idx
        vq.set_addr(q.vring_addr(), gm)
        vq.started = vq.enabled = True
        vq.drain(dev.handle)  # must not raise
        assert vq.broken or vq.used_idx == vq.last_avail
        assert mem.mm[guard_off : guard_off + MiB] == GUARD * 256
        vq.detach()
    finally:
        gm.close()
        mem.close()


def test_random_bytes_over_the_socket_do_not_kill_the_server() -> None:
    d = tempfile.mkdtemp(prefix="vuf", dir="/tmp")
    path = os.path.join(d, "s")
    srv = VhostUserBlkServer(path, MemoryStorage(4096))
    srv.start()
    try:
        @settings(max_examples=25, deadline=None)
        @given(blob=st.binary(min_size=1, max_size=200))
        def feed(blob: bytes) -> None:
            fe = MockFrontend(path, timeout=2)
            try:
                fe.sock.sendall(blob)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may drop us first: that is the point
            finally:
                fe.close()
            deadline = time.monotonic() + 5
            while srv.connected and time.monotonic() < deadline:
                time.sleep(0.002)

        feed()
        for attempt in range(20):  # still alive and serving (once the last blob is dropped)
            try:
                with MockFrontend(path) as fe:
                    assert fe.get_u64(p.Request.GET_QUEUE_NUM) == 1
                break
            except (ConnectionError, EOFError):
                assert attempt < 19
                time.sleep(0.05)
        assert all(isinstance(e, ProtocolError) for e in srv.clear_errors())
    finally:
        srv.stop()
        os.rmdir(d)
