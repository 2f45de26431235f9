"""Hostile front-end scenarios, each run in a child process by test_vhost_adversarial.py.

``python adversary.py CASE`` plays a front-end that breaks the rules on a real
unix socket against a real :class:`VhostUserBlkServer`, then prints one JSON
line saying what the backend did.  Cases that can kill the process (SIGBUS
from a shrunk memfd) or wedge its thread (a blocking call fd, a stalled
message) run here so the pytest process survives a regression and the test
can assert the outcome: the exit status, the errors the backend recorded,
how long ``stop()`` took.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from pytest_virtio.errors import BackendError
from pytest_virtio.vhost_user import BlkType, MemoryStorage, VhostUserBlkServer
from pytest_virtio.vhost_user.protocol import HEADER, VERSION, Request
from pytest_virtio.vhost_user.testing import MockFrontend, MockMemory, MockSplitQueue

MiB = 1 << 20
RING_BASE = 0x10000  # rings in the first MiB ...
DATA_BASE = 2 * MiB  # ... request buffers in the third


@contextlib.contextmanager
def _backend(**kw: Any) -> Iterator[VhostUserBlkServer]:
    with tempfile.TemporaryDirectory(prefix="vuadv", dir="/tmp") as d:
        srv = VhostUserBlkServer(os.path.join(d, "vu.sock"), MemoryStorage(MiB), **kw).start()
        try:
            yield srv
        finally:
            with contextlib.suppress(BackendError):
                srv.stop(timeout=3)


def _errors(srv: VhostUserBlkServer) -> list[str]:
    return [f"{type(e).__name__}: {e}" for e in srv.errors]


def _timed_stop(srv: VhostUserBlkServer) -> float | None:
    """Seconds stop() took, or None if the thread would not stop within 3 s."""
    t0 = time.monotonic()
    try:
        srv.stop(timeout=3)
    except BackendError:
        return None
    return time.monotonic() - t0


def _wait_used(q: MockSplitQueue, want: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while q.used_idx() != want & 0xFFFF:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _start(srv: VhostUserBlkServer, mem: MockMemory) -> tuple[MockFrontend, MockSplitQueue]:
    """A front-end with one started queue; tolerates the backend dropping it midway."""
    fe = MockFrontend(srv.socket_path)
    features, _ = fe.realize()
    q = MockSplitQueue(mem, 64, base=RING_BASE, data_base=DATA_BASE)
    with contextlib.suppress(OSError):
        fe.start(mem, [q], features)
        fe.get_u64(Request.GET_FEATURES)  # a round trip: everything above was handled
    return fe, q


def shrink_memfd(seal: bool) -> dict[str, Any]:
    """SET_MEM_TABLE, then truncate guest RAM under the mapping, then kick a request."""
    with _backend() as srv, MockMemory(4 * MiB, seal=seal) as mem:
        fe, q = _start(srv, mem)
        req = q.blk_request(BlkType.OUT, 0, b"x" * 512)  # header + data above 2 MiB
        try:
            os.ftruncate(mem.fd, MiB)  # keeps the rings, cuts the request away
            shrunk = True
        except PermissionError:
            shrunk = False
        q.publish(req.head)  # the ring page is still there
        with contextlib.suppress(OSError):
            fe.kick()
        time.sleep(0.3)
        served = q.used_idx()
        fe.close()
        return {"shrunk": shrunk, "served": served, "errors": _errors(srv),
                "status": q.status(req) if not shrunk else None}


def call_pipe(requests: int = 1000) -> dict[str, Any]:
    """A blocking pipe with room for 512 signals as the call fd, never read."""
    with _backend() as srv, MockMemory(4 * MiB) as mem:
        fe, q = _start(srv, mem)
        rd, wr = os.pipe()
        fcntl.fcntl(wr, fcntl.F_SETPIPE_SZ, 4096)  # 512 eventfd-sized writes
        fe.set_vring_fd(Request.SET_VRING_CALL, 0, wr)
        os.close(wr)
        done = 0
        for _ in range(requests):
            q.reset_alloc()
            req = q.blk_request(BlkType.IN, 0, 512)
            q.publish(req.head)
            fe.kick()
            if not _wait_used(q, done + 1, 3.0):
                break
            q.take_used()
            done += 1
        t0 = time.monotonic()
        try:
            fe.get_u64(Request.GET_FEATURES)
            control = time.monotonic() - t0
        except OSError:
            control = None
        stop = _timed_stop(srv)
        fe.close()
        os.close(rd)
        return {"completed": done, "control_s": control, "stop_s": stop, "errors": _errors(srv)}


def stall_mid_message() -> dict[str, Any]:
    """Send a header announcing 8 payload bytes, then only 4, then call stop()."""
    with _backend() as srv:
        fe = MockFrontend(srv.socket_path)
        fe.send_raw(HEADER.pack(Request.SET_FEATURES, VERSION, 8) + b"\0" * 4)
        time.sleep(0.3)  # the backend is now waiting for the rest
        stop = _timed_stop(srv)
        fe.close()
        return {"stop_s": stop, "errors": _errors(srv)}


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "shrink_unsealed": lambda: shrink_memfd(seal=False),
    "shrink_sealed": lambda: shrink_memfd(seal=True),
    "call_pipe": call_pipe,
    "stall_mid_message": stall_mid_message,
}

if __name__ == "__main__":
    print(json.dumps(CASES[sys.argv[1]]()), flush=True)
