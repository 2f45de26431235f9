"""The vhost-user-blk back-end: a unix socket, a message loop, and the rings.

One daemon thread runs a selector over the listening socket, the front-end
connection, every started queue's kick eventfd and a private wake-up eventfd.
Keeping control messages and ring processing on one thread makes the
vhost-user.rst rules that are about ordering hold by construction: every
request is complete before GET_VRING_BASE is answered ("Starting and stopping
rings"), and SET_MEM_TABLE can swap the mapping while running without a
request still holding old views.  Per kick the thread drains every available
chain and writes the call eventfd at most once.

Nothing from the front-end can crash the pytest process: a malformed message
is a :class:`ProtocolError`, recorded and answered by dropping the connection
(QEMU with ``reconnect=1`` comes back), and a broken ring only stops that ring
(and is recorded too, naming disk, queue and reason, unless fault injection
broke it).  Any exception in the thread is kept and re-raised in the test by
``check()``.  About once a second the loop re-checks every queue for work or a
call a lost notification left behind (``Virtqueue.idle_check``, counted).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import selectors
import socket
import sys
import threading
import time
import traceback
from typing import Any

from pytest_virtio.errors import BackendError, ProtocolError
from pytest_virtio.vhost_user import protocol as p
from pytest_virtio.vhost_user.blk import SECTOR_SIZE, SEG_MAX, BlkDevice, Storage
from pytest_virtio.vhost_user.faults import FaultInjector
from pytest_virtio.vhost_user.handler import OFFERED_PROTOCOL_FEATURES, BlkHandler, Reply, close_fd
from pytest_virtio.vhost_user.protocol import ProtocolFeature, Request
from pytest_virtio.vhost_user.ringcheck import RingCheck
from pytest_virtio.vhost_user.stats import Stats, Trace
from pytest_virtio.vhost_user.virtqueue import QueueBroken, Virtqueue

__all__ = ["OFFERED_PROTOCOL_FEATURES", "VhostUserBlkServer"]

_SOCKET_TIMEOUT = 10.0  # a front-end that stalls mid-message is dropped, not waited on forever
IDLE_CHECK_INTERVAL = 1.0  # seconds between Virtqueue.idle_check passes


class _Stopping(ConnectionError):
    """stop() was called while a message was half read or written: drop the connection."""


log = logging.getLogger(__name__)

def _where(thread: threading.Thread, depth: int = 4) -> str:
    """A live thread's innermost frames, ``func (file:line) < caller ...``, for a
    stuck-thread error (the innermost alone is often a stdlib wait)."""
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return "an unknown place (it just exited)"
    frames = traceback.extract_stack(frame)[-depth:]
    return " < ".join(f"{f.name} ({os.path.basename(f.filename)}:{f.lineno})"
                      for f in reversed(frames))


class VhostUserBlkServer:
    """An in-process vhost-user-blk device serving ``storage`` on ``socket_path``.

    Call :meth:`start` before launching QEMU (the socket must exist when QEMU
    connects), :meth:`stop` afterwards; or use it as a context manager.
    """

    def __init__(
        self,
        socket_path: str,
        storage: Storage,
        *,
        num_queues: int = 1,
        readonly: bool = False,
        serial: str = "pytest-virtio",
        queue_size_max: int = 1024,
        name: str | None = None,
        block_size: int = SECTOR_SIZE,
    ) -> None:
        if not 1 <= num_queues <= 256:
            raise ValueError(f"num_queues must be in 1..256, got {num_queues}")
        if queue_size_max < 2 or queue_size_max & (queue_size_max - 1) or queue_size_max > 32768:
            raise ValueError(f"queue_size_max must be a power of two <= 32768: {queue_size_max}")
        self.socket_path = socket_path
        #: The disk this serves, for error messages (default: the socket's file name).
        self.name = name or os.path.basename(socket_path)
        self.storage = storage
        self.num_queues = num_queues
        self.queue_size_max = queue_size_max
        self.stats = Stats(num_queues)
        self.faults = FaultInjector(on_break=self._request_break)
        self.trace = Trace()
        readonly = readonly or bool(getattr(storage, "readonly", False))
        self.device = BlkDevice(
            storage, readonly=readonly, serial=serial, num_queues=num_queues,
            block_size=block_size,
            # A request must fit a queue without INDIRECT_DESC: header + data + status.
            seg_max=max(1, min(SEG_MAX, queue_size_max - 2)),
            stats=self.stats, faults=self.faults, trace=self.trace,
        )
        self.session = BlkHandler(self.device, self.stats, num_queues=num_queues,
                                  queue_size_max=queue_size_max, loop=self,
                                  on_queue_broken=self._queue_broken)
        self.messages_seen: collections.Counter[str] = collections.Counter()
        #: The most recent requests in order, for failure reports.
        self.message_log: collections.deque[str] = collections.deque(maxlen=200)
        self.errors: list[BaseException] = []
        self.connections = 0
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._thread: threading.Thread | None = None
        self._wake_fd = -1
        self._stopping = False
        self._breaks: collections.deque[int] = collections.deque()
        self._connected = threading.Event()

    # --- public API ------------------------------------------------------------------

    def start(self) -> VhostUserBlkServer:
        """Bind and listen now (before QEMU starts), then serve in a daemon thread."""
        if self._thread is not None:
            raise BackendError("vhost-user server already started")
        self._stopping = False  # a stopped server may be started again (reconnect tests)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self.socket_path)
            listener.listen(8)
        except OSError as exc:
            listener.close()
            raise BackendError(f"cannot listen on {self.socket_path}: {exc}") from exc
        listener.setblocking(False)
        self._listener = listener
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sel = selectors.DefaultSelector()
        self._sel.register(listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_fd, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(
            target=self._run, name=f"vhost-user-blk:{os.path.basename(self.socket_path)}",
            daemon=True,
        )
        self._thread.start()
        log.info("vhost-user-blk %r: listening on %s (%d queue(s))", self.name, self.socket_path,
                 self.num_queues)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread, join it, close the socket and every fd.  Idempotent.

        A thread that does not stop in time (stuck in a storage call, say) is a
        BackendError saying where it is stuck; the listener, its socket file, the
        selector and the wake fd are closed all the same, and the thread, which
        sees ``_stopping`` as soon as it returns to its loop, drops the front-end
        connection and the queues itself.
        """
        try:
            self._join(timeout)
        finally:
            self._close_own_fds()

    def _join(self, timeout: float) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join(timeout)
        if thread.is_alive():
            raise BackendError(f"vhost-user thread serving {self.socket_path} did not stop "
                               f"within {timeout}s; it is in {_where(thread)}")
        self._thread = None

    def _close_own_fds(self) -> None:
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        close_fd(self._wake_fd)
        self._wake_fd = -1

    def close(self, timeout: float = 10.0) -> None:
        """Stop for good and close the storage (its fds; a stopped server may restart)."""
        try:
            self.stop(timeout)
        finally:
            self.storage.close()

    def check(self) -> None:
        """Re-raise, in the calling (test) thread, the first error the backend hit."""
        if not self.errors:
            return
        exc = self.errors[0]
        if isinstance(exc, BackendError):
            raise exc
        raise BackendError(f"vhost-user backend thread failed: {exc!r}") from exc

    raise_if_failed = check

    def clear_errors(self) -> list[BaseException]:
        """Forget recorded errors (for tests that provoke them on purpose)."""
        errors, self.errors = self.errors, []
        return errors

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def running(self) -> bool:
        return self.session.running.is_set()

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Block until a front-end is connected; BackendError on timeout."""
        self._wait(self._connected, timeout, "connect")

    def wait_running(self, timeout: float = 10.0) -> None:
        """Block until a queue is started and enabled; BackendError on timeout."""
        self._wait(self.session.running, timeout, "start a queue")

    def broken_queues(self) -> dict[int, str]:
        return dict(self.stats.broken)

    def enable_ring_check(self) -> RingCheck:
        """Check split-ring invariants on every batch from now on (see :mod:`.ringcheck`)."""
        return self.session.enable_ring_check()

    def queue_state(self) -> dict[str, Any]:
        """Every queue's indices, kicks and calls, plus stats: what a hang report needs."""
        now = time.monotonic()
        return {
            "disk": self.name, "socket": self.socket_path, "connected": self.connected,
            "connections": self.connections, "features": hex(self.features),
            "queues": [vq.state(now) for vq in list(self.queues)],
            "stats": self.stats.to_dict(),
            "errors": [repr(e) for e in self.errors],
            "ring_check_violations": (None if self.session.ring_check is None
                                      else list(self.session.ring_check.violations)),
            "recent_messages": list(self.message_log)[-20:],
        }

    def thread_cpu_seconds(self) -> float | None:
        """CPU time the serving thread has used (its per-thread clock: the same
        utime+stime as ``/proc/self/task/TID/stat``, at nanosecond resolution);
        ``None`` when it is not running.  Backend cost per request is the delta
        over a workload divided by the requests served (see workloads/mechanism.py)."""
        thread = self._thread
        if thread is None or thread.ident is None or not thread.is_alive():
            return None
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
        except OSError:
            return None

    def __enter__(self) -> VhostUserBlkServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait(self, event: threading.Event, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not event.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            self.check()
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"front-end did not {what} on {self.socket_path} within {timeout}s "
                    f"(messages seen: {dict(self.messages_seen)})"
                )
        self.check()

    def _wake(self) -> None:
        if self._wake_fd >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake_fd, 1)

    def _request_break(self, index: int) -> None:
        if not 0 <= index < self.num_queues:
            raise BackendError(f"no queue {index} (device has {self.num_queues})")
        self._breaks.append(index)
        self._wake()

    # --- the session and the loop's side of it ---------------------------------------------

    @property
    def queues(self) -> list[Virtqueue]:
        return self.session.queues

    @property
    def features(self) -> int:
        """The virtio features the front-end acked (SET_FEATURES)."""
        return self.session.features

    def watch(self, fd: int, vq: Virtqueue) -> None:
        """KickWatcher: serve ``vq`` when its kick eventfd ``fd`` is readable."""
        if self._sel is not None:
            self._sel.register(fd, selectors.EVENT_READ, vq)

    def unwatch(self, fd: int) -> None:
        if self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(fd)

    # --- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        next_idle_check = time.monotonic() + IDLE_CHECK_INTERVAL
        try:
            while not self._stopping:
                for key, _events in sel.select(IDLE_CHECK_INTERVAL):
                    if self._stopping:
                        break
                    if sel.get_map().get(key.fd) is not key:
                        continue  # unregistered (or fd reused) by an earlier event of the batch
                    self._dispatch_event(key.data)
                now = time.monotonic()
                if now >= next_idle_check and not self._stopping:
                    next_idle_check = now + IDLE_CHECK_INTERVAL
                    self._dispatch_event("idle")
        except BaseException as exc:
            log.error("vhost-user-blk %r: backend thread failed: %r", self.name, exc)
            self.errors.append(exc)
        finally:
            self._disconnect()

    def _dispatch_event(self, tag: Any) -> None:
        try:
            if isinstance(tag, Virtqueue):
                self.session.kick(tag)
            elif tag == "conn":
                self._on_message()
            elif tag == "accept":
                self._accept()
            elif tag == "wake":
                self._on_wake()
            elif tag == "idle":
                self.session.idle_check()
        except ProtocolError as exc:
            log.warning("vhost-user-blk %r: protocol error, disconnecting: %s", self.name, exc)
            self.errors.append(exc)
            self._disconnect()
        except (ConnectionError, TimeoutError, EOFError) as exc:
            log.info("vhost-user-blk %r: front-end lost: %r", self.name, exc)
            self._disconnect()
        except Exception as exc:
            log.error("vhost-user-blk %r: error, disconnecting: %r", self.name, exc)
            self.errors.append(exc)
            self._disconnect()

    def _accept(self) -> None:
        assert self._listener is not None and self._sel is not None
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._conn is not None and self._peer_gone(self._conn):
            self._disconnect()  # its EOF was still queued behind this reconnect
        if self._conn is not None:
            conn.close()  # one front-end at a time
            log.warning("vhost-user-blk %r: refused a second front-end", self.name)
            return
        conn.setblocking(True)
        conn.settimeout(_SOCKET_TIMEOUT)
        self._conn = conn
        self.connections += 1
        self._sel.register(conn, selectors.EVENT_READ, "conn")
        self._connected.set()
        log.info("vhost-user-blk %r: front-end connected (connection %d)", self.name,
                 self.connections)

    @staticmethod
    def _peer_gone(conn: socket.socket) -> bool:
        """True if the connection has hung up (EOF is all that is left to read)."""
        try:
            readable, _, _ = select.select([conn], [], [], 0)
            if not readable:
                return False
            return conn.recv(1, socket.MSG_PEEK) == b""  # readable: cannot block
        except OSError:
            return True

    def _disconnect(self) -> None:
        """EOF or a broken front-end: drop everything it gave us, await the next one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            log.info("vhost-user-blk %r: front-end disconnected", self.name)
            if self._sel is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(conn)
            conn.close()
        self.session.teardown()
        self._connected.clear()

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)
        while self._breaks:
            index = self._breaks.popleft()
            self.queues[index].mark_broken(f"queue {index} broken by fault injection",
                                           report=False)

    def _queue_broken(self, vq: Virtqueue, reason: str) -> None:
        """A ring broke the rules: the guest's I/O on it can never finish, so say why."""
        log.error("vhost-user-blk %r: queue %d broken: %s", self.name, vq.index, reason)
        self.errors.append(QueueBroken(
            f"vhost-user-blk disk {self.name!r}: queue {vq.index} is broken: {reason}"
        ))

    # --- messages ---------------------------------------------------------------------------

    def _await_conn(self, deadline: float, *, write: bool = False) -> None:
        """Wait until the connection can be read (or written) without blocking.

        A front-end may stall half-way through a message; the loop then waits
        here rather than in ``recv``, so ``stop()`` (which writes the wake fd)
        is honoured at once and a stall is cut off after ``_SOCKET_TIMEOUT``.
        """
        conn = self._conn
        assert conn is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"front-end stalled mid-message for {_SOCKET_TIMEOUT:.0f}s")
            rlist: list[Any] = [self._wake_fd] if write else [conn, self._wake_fd]
            readable, writable, _ = select.select(rlist, [conn] if write else [], [], left)
            if self._stopping:
                raise _Stopping("backend stopping")
            if writable or conn in readable:
                return
            if self._wake_fd in readable:
                self._on_wake()  # a queue-break request; keep waiting for the message

    def _recv_exact(self, n: int) -> bytes:
        assert self._conn is not None
        chunks = []
        deadline = time.monotonic() + _SOCKET_TIMEOUT
        while n:
            self._await_conn(deadline)
            chunk = self._conn.recv(n)
            if not chunk:
                raise EOFError("front-end closed the connection mid-message")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _recv_message(self) -> tuple[p.Header, bytes, list[int]] | None:
        """Read one message; SCM_RIGHTS fds arrive with the header (up to 8)."""
        assert self._conn is not None
        data, fds, msg_flags, _ = socket.recv_fds(self._conn, p.HEADER_SIZE, p.MAX_FDS)
        try:
            if msg_flags & socket.MSG_CTRUNC:
                raise ProtocolError("front-end sent more fds than a message may carry")
            if not data:
                if fds:
                    raise ProtocolError("fds without a message")
                return None
            if len(data) < p.HEADER_SIZE:
                data += self._recv_exact(p.HEADER_SIZE - len(data))
            header = p.decode_header(data)
            payload = self._recv_exact(header.size) if header.size else b""
        except BaseException:
            for fd in fds:
                close_fd(fd)
            raise
        return header, payload, list(fds)

    def _on_message(self) -> None:
        msg = self._recv_message()
        if msg is None:
            self._disconnect()
            return
        header, payload, fds = msg
        refused = False
        try:
            request = p.request_of(header)
            self.messages_seen[request.name] += 1
            self.message_log.append(request.name)
            log.debug("vhost-user-blk %r: <- %s (%d bytes, %d fd(s))", self.name, request.name,
                      len(payload), len(fds))
            p.check_payload_size(request, payload)
            p.check_fd_count(request, payload, len(fds))
            reply = self.session.handle(request, header, payload, fds)
        except ProtocolError as exc:
            log.warning("vhost-user-blk %r: refused a message: %s", self.name, exc)
            # Record before answering so a test that saw the NAK also sees the error.
            self.errors.append(exc)
            self._maybe_ack(header, failed=True)
            refused = True
        finally:
            for fd in fds:  # whatever a handler did not take
                close_fd(fd)
        if refused:
            # After the close: ``connected`` going false promises the front-end's fds are gone.
            self._disconnect()
            return
        if request in p.ALWAYS_REPLY:
            self._send_reply(request, reply)
        else:
            self._maybe_ack(header, failed=False)

    def _maybe_ack(self, header: p.Header, failed: bool) -> None:
        if (
            header.need_reply
            and self.session.protocol_features & ProtocolFeature.REPLY_ACK
            and header.request not in p.ALWAYS_REPLY
            and self._conn is not None
        ):
            with contextlib.suppress(OSError):
                self._await_conn(time.monotonic() + _SOCKET_TIMEOUT, write=True)
                self._conn.sendall(p.encode_reply(header.request, p.encode_u64(int(failed))))

    def _send_reply(self, request: Request, reply: Reply) -> None:
        assert self._conn is not None
        self._await_conn(time.monotonic() + _SOCKET_TIMEOUT, write=True)
        if isinstance(reply, tuple):
            payload, fd = reply
            socket.send_fds(self._conn, [p.encode_reply(request, payload)], [fd])
        else:
            self._conn.sendall(p.encode_reply(request, reply or b""))
