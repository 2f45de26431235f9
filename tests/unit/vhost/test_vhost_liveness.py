"""Liveness of the rings: idle re-checks, the invariant checker, broken queues reported.

Issue 16: a lost kick left the guest waiting for ever with no error anywhere,
and a broken queue surfaced only as a 129 s GuestTimeout.  These drive the
real Virtqueue with a mock driver (vhost_rig) or the real server over its
socket (MockFrontend).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator

import pytest
from vhost_rig import Rig

from pytest_virtio.errors import BackendError
from pytest_virtio.vhost_user import MemoryStorage, VhostUserBlkServer
from pytest_virtio.vhost_user.protocol import BlkType
from pytest_virtio.vhost_user.ringcheck import RingCheck
from pytest_virtio.vhost_user.testing import MockFrontend, MockMemory, MockSplitQueue
from pytest_virtio.vhost_user.virtqueue import DESC_F_WRITE, QueueBroken


@pytest.fixture
def erig() -> Iterator[Rig]:
    r = Rig(event_idx=True)
    yield r
    r.close()


def test_idle_check_serves_an_unkicked_request_and_counts_it(erig: Rig) -> None:
    req = erig.q.blk_request(BlkType.IN, 0, 512)
    erig.q.publish(req.head)  # no kick: the notification was lost
    erig.vq.idle_check(erig.dev.handle)
    assert erig.q.used_idx() == 0, "acted before a whole quiet interval had passed"
    erig.vq.idle_check(erig.dev.handle)
    assert erig.q.used_idx() == 1 and erig.q.status(req) == 0
    assert erig.stats.idle_rechecks_found_work[0] == 1
    assert erig.calls() == 1
    assert erig.stats.to_dict()["idle_rechecks_found_work"] == 1


def test_idle_check_leaves_memory_that_is_no_longer_a_ring_alone(erig: Rig) -> None:
    """The OS reused the memory of a ring its firmware set up and abandoned: an avail
    index no driver can publish. Nobody kicked, so it is counted, not a broken queue;
    a kick on the same garbage is still judged (broken, naming the jump)."""
    erig.q.set_avail_idx(29791)
    for _ in range(3):
        erig.vq.idle_check(erig.dev.handle)
    assert not erig.vq.broken
    assert erig.stats.to_dict()["idle_rechecks_not_a_ring"] == 2
    assert erig.stats.to_dict()["idle_rechecks_found_work"] == 0
    assert erig.run() == 0
    assert erig.vq.broken and "avail index jumped by 29791" in erig.vq.broken_reason


def test_idle_check_leaves_a_healthy_queue_alone(erig: Rig) -> None:
    for _ in range(3):
        erig.q.publish(erig.q.blk_request(BlkType.IN, 0, 512).head)
        erig.vq.kick_fd = -1
        assert erig.run() == 1
        erig.q.take_used()
        erig.q.reset_alloc()
        for _ in range(3):
            erig.vq.idle_check(erig.dev.handle)
    s = erig.stats.to_dict()
    assert s["idle_rechecks_found_work"] == 0 and s["idle_calls_resent"] == 0


def test_idle_check_resends_a_call_the_driver_is_owed(erig: Rig) -> None:
    erig.q.set_used_event(100)  # the driver does not want a call yet
    erig.q.publish(erig.q.blk_request(BlkType.IN, 0, 512).head)
    assert erig.run() == 1 and erig.calls() == 0
    erig.q.set_used_event(0)  # now it waits for the call after used entry 0
    erig.vq.idle_check(erig.dev.handle)
    erig.vq.idle_check(erig.dev.handle)
    assert erig.calls() == 1
    assert erig.stats.idle_calls_resent[0] == 1
    erig.vq.idle_check(erig.dev.handle)
    assert erig.calls() == 0, "the owed call is sent once"


def test_ring_check_passes_a_long_run_and_flags_a_stomped_used_slot(erig: Rig) -> None:
    check = erig.vq.check = RingCheck()
    for _ in range(50):  # 50 batches of 1..6 wrap the 64-entry ring several times
        heads = [erig.q.blk_request(BlkType.IN, 8, 512, indirect=True).head
                 for _ in range(1 + _ % 6)]
        erig.q.publish(*heads)
        assert erig.run() == len(heads)
        assert [u[0] for u in erig.q.take_used()] == heads
        erig.q.reset_alloc()
    assert check.violations == [] and check.requests == sum(1 + i % 6 for i in range(50))

    handle = erig.dev.handle
    first_slot = erig.vq.used_idx % 64
    calls = []

    def stomping(q: int, r: list[memoryview], rl: int, w: list[memoryview], wl: int) -> int:
        calls.append(q)
        if len(calls) == 2:  # overwrite the batch's first used element before used.idx
            erig.mem.write(erig.q.used_gpa + 4 + 8 * first_slot, bytes(8))
        return handle(q, r, rl, w, wl)

    erig.q.publish(*(erig.q.blk_request(BlkType.IN, 0, 512).head for _ in range(2)))
    assert erig.vq.drain(stomping) == 2
    assert any("used slot" in v for v in check.violations), check.violations


def test_queue_state_reports_indices_and_waiting_heads(erig: Rig) -> None:
    erig.q.publish(erig.q.blk_request(BlkType.IN, 0, 512).head)
    assert erig.run() == 1
    waiting = erig.q.blk_request(BlkType.IN, 0, 512).head
    erig.q.publish(waiting)
    state = erig.vq.state()
    ring = state["ring"]
    assert isinstance(ring, dict)
    assert (state["last_avail"], ring["avail_idx"], ring["used_idx"]) == (1, 2, 1)
    assert ring["waiting_unserved"] == 1 and ring["waiting_heads"] == [waiting]
    assert state["last_call_s_ago"] is not None and state["last_kick_s_ago"] is None
    erig.vq.detach()
    assert erig.vq.state()["ring"] == "not mapped"


@pytest.fixture
def server() -> Iterator[VhostUserBlkServer]:
    d = tempfile.mkdtemp(prefix="vul", dir="/tmp")
    srv = VhostUserBlkServer(os.path.join(d, "vu.sock"), MemoryStorage(1 << 20), name="data")
    srv.start()
    yield srv
    srv.stop()
    os.rmdir(d)


def _started(server: VhostUserBlkServer, mem: MockMemory) -> tuple[MockFrontend, MockSplitQueue]:
    fe = MockFrontend(server.socket_path)
    features, _ = fe.realize()
    q = MockSplitQueue(mem, 64, base=0x10000, data_base=0x100000)
    fe.start(mem, [q], features)
    server.wait_running(5)
    return fe, q


def test_a_queue_the_driver_breaks_is_an_error_naming_disk_and_queue(
        server: VhostUserBlkServer) -> None:
    with MockMemory(4 << 20) as mem:
        fe, q = _started(server, mem)
        with fe:
            q.write_desc(0, 0x7FFF_0000_0000, 512, DESC_F_WRITE)
            q.publish(0)
            fe.kick()
            deadline = time.monotonic() + 5
            while not server.errors and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(QueueBroken, match=r"disk 'data': queue 0 is broken: .*mapped"):
                server.check()
            state = json.loads(json.dumps(server.queue_state(), default=str))
            assert state["disk"] == "data" and state["queues"][0]["broken"]
            assert state["stats"]["broken_queues"]
    assert len(server.clear_errors()) == 1


def test_a_break_injected_on_purpose_is_not_an_error(server: VhostUserBlkServer) -> None:
    with MockMemory(4 << 20) as mem:
        fe, _ = _started(server, mem)
        with fe:
            server.faults.break_queue(0)
            deadline = time.monotonic() + 5
            while not server.broken_queues() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.broken_queues()
    server.check()


def test_ring_check_on_a_served_queue(server: VhostUserBlkServer) -> None:
    check = server.enable_ring_check()
    with MockMemory(4 << 20) as mem:
        fe, q = _started(server, mem)
        with fe:
            for _ in range(20):
                q.publish(*(q.blk_request(BlkType.OUT, 0, b"x" * 512).head for _ in range(3)))
                fe.kick()
                fe.wait_call()
                q.take_used()
                q.reset_alloc()
    assert check.requests == 60 and check.violations == []
    with pytest.raises(BackendError, match="no queue"):
        server.faults.break_queue(3)
