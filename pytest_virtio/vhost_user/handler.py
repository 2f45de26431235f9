"""The vhost-user-blk protocol handler: one front-end session's state and messages.

What a front-end has told us (features, memory table, rings, their fds, the
inflight area) and the answer to every message (vhost-user.rst "Front-end
message types"), kept apart from the socket and thread that carry them
(``server.py``) and from the device semantics (``blk.py``), as rust-vmm keeps
its backend handler, event loop and device apart. It runs on the server's one
thread; the only thing it asks of the loop is to watch a queue's kick fd.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
from collections.abc import Callable, Mapping
from typing import Protocol

from pytest_virtio.errors import ProtocolError
from pytest_virtio.vhost_user import protocol as p
from pytest_virtio.vhost_user.blk import BlkDevice
from pytest_virtio.vhost_user.memory import GuestMemory
from pytest_virtio.vhost_user.protocol import ProtocolFeature, Request, TransportFeature
from pytest_virtio.vhost_user.ringcheck import RingCheck
from pytest_virtio.vhost_user.stats import Stats
from pytest_virtio.vhost_user.virtqueue import Virtqueue

__all__ = ["OFFERED_PROTOCOL_FEATURES", "BlkHandler", "KickWatcher", "Reply", "close_fd"]

#: Only what is implemented (QEMU switches on every bit it knows that we offer).
OFFERED_PROTOCOL_FEATURES = int(
    ProtocolFeature.MQ
    | ProtocolFeature.REPLY_ACK
    | ProtocolFeature.CONFIG
    | ProtocolFeature.INFLIGHT_SHMFD
    | ProtocolFeature.RESET_DEVICE
)
_EVENTFD_LINK = "anon_inode:[eventfd]"  # readlink of an eventfd's /proc/self/fd entry
_INFLIGHT_QUEUE_HDR = 16  # vhost-user.rst "Inflight I/O tracking": split queue region header
_INFLIGHT_DESC = 16  # DescStateSplit

#: A handler's answer: a payload, a payload with one fd to pass, or nothing (ack only).
Reply = bytes | tuple[bytes, int] | None


def close_fd(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fd_kind(fd: int) -> str:
    """What an fd is, as /proc names it (``anon_inode:[eventfd]``, ``pipe:[…]``, a path)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        return f"unknown ({exc.strerror})"


class KickWatcher(Protocol):
    """The event loop's side: serve ``vq`` when ``fd`` (its kick eventfd) is readable."""

    def watch(self, fd: int, vq: Virtqueue) -> None: ...

    def unwatch(self, fd: int) -> None: ...


class BlkHandler:
    """One front-end session of a :class:`~.blk.BlkDevice`: state and message handlers.

    ``handle`` answers one message; ``teardown`` drops everything the
    front-end gave (its fds, mappings, rings) and starts a new session.
    ``running`` is set while a queue is started and enabled.
    """

    def __init__(self, device: BlkDevice, stats: Stats, *, num_queues: int,
                 queue_size_max: int, loop: KickWatcher,
                 on_queue_broken: Callable[[Virtqueue, str], None]) -> None:
        self.device = device
        self.stats = stats
        self.num_queues = num_queues
        self.queue_size_max = queue_size_max
        self.running = threading.Event()
        self.ring_check: RingCheck | None = None
        self._loop = loop
        self._on_queue_broken = on_queue_broken
        self._reset_session()

    def handle(self, request: Request, header: p.Header, payload: bytes,
               fds: list[int]) -> Reply:
        """The answer to one validated message; a handler pops the fds it keeps."""
        return _HANDLERS[request](self, header, payload, fds)

    def enable_ring_check(self) -> RingCheck:
        check = self.ring_check = RingCheck()
        for vq in self.queues:
            vq.check = check
        return check

    def kick(self, vq: Virtqueue) -> None:
        if vq.kick_fd >= 0:
            vq.kick(self.device.handle)

    def idle_check(self) -> None:
        for vq in self.queues:
            vq.idle_check(self.device.handle)

    def _reset_session(self) -> None:
        self.features = 0
        self.protocol_features = 0
        self.status = 0
        self.mem: GuestMemory | None = None
        self.queues = [
            Virtqueue(i, self.queue_size_max, self.stats) for i in range(self.num_queues)
        ]
        for vq in self.queues:
            vq.on_broken = self._on_queue_broken
            vq.check = self.ring_check
        self._inflight_fd = -1
        self._inflight_map: mmap.mmap | None = None

    def _release_queue_fds(self, vq: Virtqueue) -> None:
        self._set_kick(vq, -1)
        close_fd(vq.call_fd)
        close_fd(vq.err_fd)
        vq.call_fd = vq.err_fd = -1

    def teardown(self) -> None:
        for vq in self.queues:
            self._release_queue_fds(vq)
            vq.detach()
        if self.mem is not None:
            self.mem.close()
        if self._inflight_map is not None:
            self._inflight_map.close()
        close_fd(self._inflight_fd)
        self._reset_session()
        self.running.clear()

    def _queue(self, index: int) -> Virtqueue:
        if not 0 <= index < self.num_queues:
            raise ProtocolError(f"queue index {index} out of range (device has {self.num_queues})")
        return self.queues[index]

    # --- handlers (vhost-user.rst "Front-end message types") ---------------------------------

    def _offered_features(self) -> int:
        return self.device.features | int(TransportFeature.PROTOCOL_FEATURES)

    def _get_features(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        return p.encode_u64(self._offered_features())

    def _set_features(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        features = p.decode_u64(payload)
        if features & ~self._offered_features():
            raise ProtocolError(f"front-end acked features we never offered: {features:#x}")
        self.features = features
        for vq in self.queues:
            vq.event_idx = bool(features & TransportFeature.EVENT_IDX)
            vq.indirect = bool(features & TransportFeature.INDIRECT_DESC)
        return None

    def _set_owner(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        return None

    def _get_protocol_features(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        return p.encode_u64(OFFERED_PROTOCOL_FEATURES)

    def _set_protocol_features(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        value = p.decode_u64(payload)
        if value & ~OFFERED_PROTOCOL_FEATURES:
            raise ProtocolError(f"front-end acked protocol features we never offered: {value:#x}")
        self.protocol_features = value
        return None

    def _get_queue_num(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        return p.encode_u64(self.num_queues)

    def _get_max_mem_slots(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        return p.encode_u64(p.MAX_REGIONS)

    def _set_status(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        self.status = p.decode_u64(payload) & 0xFF
        return None

    def _get_status(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        return p.encode_u64(self.status)

    def _reset_device(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        for vq in self.queues:
            self._release_queue_fds(vq)
            vq.reset()
            vq.enabled = False
            if self.mem is not None:
                vq.attach(self.mem)
        self.features = 0
        self.running.clear()
        return None

    def _set_mem_table(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        regions = p.decode_mem_table(payload)
        new = GuestMemory(regions, fds)  # mmap holds its own reference; fds closed by caller
        old, self.mem = self.mem, new
        for vq in self.queues:
            vq.attach(new)  # drops views into the old mapping first
        if old is not None:
            old.close()
        return None

    def _set_vring_num(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        state = p.decode_vring_state(payload)
        vq = self._queue(state.index)
        vq.set_num(state.num)
        if vq.addr is not None and self.mem is not None:
            vq.attach(self.mem)  # views sized for the old number would be stale
        return None

    def _set_vring_base(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        state = p.decode_vring_state(payload)
        self._queue(state.index).set_base(state.num)
        return None

    def _set_vring_addr(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        addr = p.decode_vring_addr(payload)
        vq = self._queue(addr.index)
        if vq.size == 0:
            raise ProtocolError(f"SET_VRING_ADDR for queue {addr.index} before SET_VRING_NUM")
        vq.set_addr(addr, self.mem)
        return None

    def _get_vring_base(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        """Stop the ring and report last_avail_idx; nothing is in flight by construction."""
        state = p.decode_vring_state(payload)
        vq = self._queue(state.index)
        self._set_kick(vq, -1)
        vq.started = False
        if not any(q.ready for q in self.queues):
            self.running.clear()
        return p.encode_vring_state(p.VringState(state.index, vq.last_avail))

    def _set_kick(self, vq: Virtqueue, fd: int) -> None:
        if vq.kick_fd >= 0:
            self._loop.unwatch(vq.kick_fd)
            close_fd(vq.kick_fd)
        vq.kick_fd = fd
        if fd >= 0:
            self._loop.watch(fd, vq)

    def _take_vring_fd(self, payload: bytes, fds: list[int]) -> tuple[Virtqueue, int]:
        vf = p.decode_vring_file(payload)
        vq = self._queue(vf.index)
        return vq, (-1 if vf.nofd else fds.pop())

    def _set_vring_kick(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        vq, fd = self._take_vring_fd(payload, fds)
        if fd < 0:
            raise ProtocolError("polling mode (SET_VRING_KICK without fd) is not supported")
        kind = _fd_kind(fd)
        if kind != _EVENTFD_LINK:
            close_fd(fd)
            raise ProtocolError(f"SET_VRING_KICK for queue {vq.index}: the fd is {kind}, "
                                "not an eventfd (vhost-user.rst: kick fds are eventfds)")
        os.set_blocking(fd, False)
        self._set_kick(vq, fd)
        vq.started = True
        if not self.features & TransportFeature.PROTOCOL_FEATURES:
            vq.enabled = True  # vhost-user.rst: rings start enabled without bit 30
        self._service(vq)
        return None

    def _set_vring_call(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        vq, fd = self._take_vring_fd(payload, fds)
        if fd >= 0:
            os.set_blocking(fd, False)  # a full pipe must drop the signal, not stall the loop
        close_fd(vq.call_fd)
        vq.call_fd = fd
        return None

    def _set_vring_err(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        vq, fd = self._take_vring_fd(payload, fds)
        if fd >= 0:
            os.set_blocking(fd, False)
        close_fd(vq.err_fd)
        vq.err_fd = fd
        return None

    def _set_vring_enable(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        state = p.decode_vring_state(payload)
        vq = self._queue(state.index)
        if state.num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE with {state.num}")
        vq.enabled = bool(state.num)
        self._service(vq)
        return None

    def _service(self, vq: Virtqueue) -> None:
        """A queue just became usable: note it and serve what the guest queued already."""
        if vq.ready:
            self.running.set()
            vq.drain(self.device.handle)

    def _get_config(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        cfg = p.decode_config(payload)
        data = self.device.read_config(cfg.offset, cfg.size)
        return p.encode_config(p.ConfigSpace(cfg.offset, cfg.size, cfg.flags, data))

    def _set_config(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        cfg = p.decode_config(payload)
        self.device.write_config(cfg.offset, cfg.data)
        return None

    def _get_inflight_fd(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        """Share a zeroed inflight area (vhost-user.rst "Inflight I/O tracking").

        Requests complete in order on this one thread, so after a reconnect the
        front-end's restored last_avail_idx (= used idx) replays exactly the
        unfinished ones; the area exists so QEMU can hand it back.
        """
        req = p.decode_inflight(payload)
        if not 1 <= req.num_queues <= self.num_queues or not 1 <= req.queue_size <= 32768:
            raise ProtocolError(f"GET_INFLIGHT_FD for {req.num_queues}x{req.queue_size}")
        per_queue = _INFLIGHT_QUEUE_HDR + _INFLIGHT_DESC * req.queue_size
        per_queue = (per_queue + 63) & ~63
        size = per_queue * req.num_queues
        fd = os.memfd_create("vhost-user-blk-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        # The front-end gets this fd: sealed, it cannot shrink it under our mapping (SIGBUS).
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        if self._inflight_map is not None:
            self._inflight_map.close()
        close_fd(self._inflight_fd)
        self._inflight_fd = fd
        self._inflight_map = mmap.mmap(fd, size)
        for q in range(req.num_queues):
            # version 1 and desc_num, so a reader of the area sees a valid header
            self._inflight_map[q * per_queue + 8 : q * per_queue + 12] = (
                (1).to_bytes(2, "little") + req.queue_size.to_bytes(2, "little")
            )
        inf = p.Inflight(size, 0, req.num_queues, req.queue_size)
        return p.encode_inflight(inf), fd

    def _set_inflight_fd(self, h: p.Header, payload: bytes, fds: list[int]) -> Reply:
        inf = p.decode_inflight(payload)
        if inf.num_queues > self.num_queues:
            raise ProtocolError(f"SET_INFLIGHT_FD for {inf.num_queues} queues")
        if self._inflight_map is not None:
            self._inflight_map.close()
            self._inflight_map = None
        close_fd(self._inflight_fd)
        self._inflight_fd = fds.pop()
        return None


_Handler = Callable[[BlkHandler, p.Header, bytes, list[int]], Reply]
_HANDLERS: Mapping[Request, _Handler] = {
    Request.GET_FEATURES: BlkHandler._get_features,
    Request.SET_FEATURES: BlkHandler._set_features,
    Request.SET_OWNER: BlkHandler._set_owner,
    Request.RESET_OWNER: BlkHandler._reset_device,
    Request.GET_PROTOCOL_FEATURES: BlkHandler._get_protocol_features,
    Request.SET_PROTOCOL_FEATURES: BlkHandler._set_protocol_features,
    Request.GET_QUEUE_NUM: BlkHandler._get_queue_num,
    Request.SET_MEM_TABLE: BlkHandler._set_mem_table,
    Request.SET_VRING_NUM: BlkHandler._set_vring_num,
    Request.SET_VRING_BASE: BlkHandler._set_vring_base,
    Request.SET_VRING_ADDR: BlkHandler._set_vring_addr,
    Request.GET_VRING_BASE: BlkHandler._get_vring_base,
    Request.SET_VRING_KICK: BlkHandler._set_vring_kick,
    Request.SET_VRING_CALL: BlkHandler._set_vring_call,
    Request.SET_VRING_ERR: BlkHandler._set_vring_err,
    Request.SET_VRING_ENABLE: BlkHandler._set_vring_enable,
    Request.GET_CONFIG: BlkHandler._get_config,
    Request.SET_CONFIG: BlkHandler._set_config,
    Request.GET_INFLIGHT_FD: BlkHandler._get_inflight_fd,
    Request.SET_INFLIGHT_FD: BlkHandler._set_inflight_fd,
    Request.RESET_DEVICE: BlkHandler._reset_device,
    Request.GET_MAX_MEM_SLOTS: BlkHandler._get_max_mem_slots,
    Request.SET_STATUS: BlkHandler._set_status,
    Request.GET_STATUS: BlkHandler._get_status,
}
