"""A mock *driver*: synthetic guest RAM plus the driver's half of a split ring.

Unit tests and the benchmark exercise the backend exactly as a guest would,
without QEMU: guest RAM is an anonymous memfd (shared with the backend through
the same ``GuestMemory`` path SET_MEM_TABLE uses), the rings are laid out per
virtio 1.2 §2.7 (desc 16-aligned, avail 2-aligned, used 4-aligned), chains
are built direct or through an indirect table (§2.7.5.3), and the driver
publishes avail entries and reads used entries like a real one.  It also lets
tests write malformed descriptors on purpose.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_virtio.vhost_user.blk import OUTHDR, SEGMENT
from pytest_virtio.vhost_user.memory import GuestMemory
from pytest_virtio.vhost_user.protocol import (
    HEADER,
    MAX_FDS,
    U64,
    VERSION,
    VRING_STATE,
    BlkType,
    HeaderFlag,
    MemRegion,
    Request,
    VringAddr,
    encode_mem_table,
    encode_message,
    encode_vring_addr,
)
from pytest_virtio.vhost_user.virtqueue import (
    DESC,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    USED_ELEM,
    ring_sizes,
)

__all__ = [
    "BlkRequest", "MockFrontend", "MockMemory", "MockSplitQueue", "QueueFds", "sealed_memfd",
    "segments",
]

U16 = struct.Struct("<H")
UVA_BASE = 0x7F00_0000_0000


def sealed_memfd(size: int, name: str = "pytest-virtio-mock-ram", *, seal: bool = True) -> int:
    """A memfd of ``size`` bytes sealed as QEMU's memory-backend-memfd seals it (seal=on)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        if seal:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


class MockMemory:
    """Guest RAM on a memfd.

    ``layout`` is a list of ``(gpa, size)`` regions carved consecutively out of
    one memfd (so regions share an fd at different mmap offsets, like QEMU's
    below/above-4G split); UVAs are ``UVA_BASE + file offset``.  Like QEMU's
    memory-backend-memfd (``seal=on``) the memfd is sealed against shrinking and
    growing; ``seal=False`` plays a front-end that does not seal.
    """

    def __init__(self, size: int = 16 << 20, layout: list[tuple[int, int]] | None = None,
                 *, seal: bool = True) -> None:
        layout = layout or [(0, size)]
        total = sum(s for _, s in layout)
        self.fd = sealed_memfd(total, seal=seal)
        self.mm = mmap.mmap(self.fd, total)
        self.regions: list[MemRegion] = []
        offset = 0
        for gpa, rsize in layout:
            self.regions.append(MemRegion(gpa, rsize, UVA_BASE + offset, offset))
            offset += rsize
        self.size = total

    def offset(self, gpa: int, length: int = 1) -> int:
        """File offset of a guest-physical range that lies in one region."""
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.mmap_offset + gpa - r.gpa
        raise ValueError(f"mock: gpa {gpa:#x}+{length} not in one region")

    def uva(self, gpa: int) -> int:
        return UVA_BASE + self.offset(gpa)

    def _pieces(self, gpa: int, length: int) -> list[tuple[int, int]]:
        """(file offset, length) pieces of a range that may span GPA-adjacent regions."""
        out = []
        while length > 0:
            r = next((r for r in self.regions if r.gpa <= gpa < r.gpa + r.size), None)
            if r is None:
                raise ValueError(f"mock: gpa {gpa:#x} not mapped")
            take = min(length, r.gpa + r.size - gpa)
            out.append((r.mmap_offset + gpa - r.gpa, take))
            gpa += take
            length -= take
        return out

    def write(self, gpa: int, data: bytes) -> None:
        pos = 0
        for off, n in self._pieces(gpa, len(data)):
            self.mm[off : off + n] = data[pos : pos + n]
            pos += n

    def read(self, gpa: int, length: int) -> bytes:
        return b"".join(self.mm[off : off + n] for off, n in self._pieces(gpa, length))

    def guest_memory(self) -> GuestMemory:
        """The backend's view, built exactly as SET_MEM_TABLE would build it."""
        return GuestMemory(self.regions, [self.fd] * len(self.regions))

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)

    def __enter__(self) -> MockMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class BlkRequest:
    """Where a virtio-blk request's parts live in guest memory."""

    head: int
    header_gpa: int
    data_gpa: int
    data_len: int
    status_gpa: int


class MockSplitQueue:
    """The driver side of one split ring placed at ``base`` in guest memory."""

    def __init__(self, mem: MockMemory, size: int = 256, base: int = 0x10000,
                 data_base: int | None = None) -> None:
        self.mem = mem
        self.size = size
        dsz, asz, usz = ring_sizes(size)
        self.desc_gpa = base
        self.avail_gpa = base + dsz
        self.used_gpa = (self.avail_gpa + asz + 3) & ~3
        self.end = self.used_gpa + usz
        self.data_base = data_base if data_base is not None else (self.end + 4095) & ~4095
        self._bump = self.data_base
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(size))
        self.chains: dict[int, list[int]] = {}
        mem.write(base, bytes(self.end - base))

    # --- layout -----------------------------------------------------------------

    def vring_addr(self, index: int = 0) -> VringAddr:
        """SET_VRING_ADDR payload: front-end virtual addresses of the three parts."""
        m = self.mem
        return VringAddr(index, 0, m.uva(self.desc_gpa), m.uva(self.used_gpa),
                         m.uva(self.avail_gpa), 0)

    def alloc(self, length: int, align: int = 16) -> int:
        """Bump-allocate a guest buffer after the rings."""
        gpa = (self._bump + align - 1) & ~(align - 1)
        self._bump = gpa + length
        return gpa

    def reset_alloc(self) -> None:
        self._bump = self.data_base

    # --- raw ring access (for malicious tests too) --------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0,
                   table: int | None = None) -> None:
        base = self.desc_gpa if table is None else table
        self.mem.write(base + 16 * i, DESC.pack(addr, length, flags, nxt))

    def set_avail_slot(self, slot: int, head: int) -> None:
        self.mem.write(self.avail_gpa + 4 + 2 * (slot % self.size), U16.pack(head))

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write(self.avail_gpa + 2, U16.pack(self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write(self.avail_gpa, U16.pack(flags))

    def set_used_event(self, value: int) -> None:
        self.mem.write(self.avail_gpa + 4 + 2 * self.size, U16.pack(value & 0xFFFF))

    def used_idx(self) -> int:
        return int(U16.unpack(self.mem.read(self.used_gpa + 2, 2))[0])

    def used_flags(self) -> int:
        return int(U16.unpack(self.mem.read(self.used_gpa, 2))[0])

    def avail_event(self) -> int:
        return int(U16.unpack(self.mem.read(self.used_gpa + 4 + 8 * self.size, 2))[0])

    def set_used_idx(self, idx: int) -> None:
        """Start the used ring at ``idx`` (the backend adopts it at SET_VRING_ADDR)."""
        self.last_used = idx & 0xFFFF
        self.mem.write(self.used_gpa + 2, U16.pack(self.last_used))

    # --- chains -------------------------------------------------------------------

    def add_chain(self, bufs: list[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Write a chain of (gpa, len, device_writable) buffers; returns its head."""
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, (gpa, length, w) in enumerate(bufs):
                flags = (DESC_F_WRITE if w else 0) | (DESC_F_NEXT if i + 1 < len(bufs) else 0)
                self.write_desc(i, gpa, length, flags, i + 1, table=table)
            head = self.free.pop(0)
            self.write_desc(head, table, 16 * len(bufs), DESC_F_INDIRECT)
            self.chains[head] = [head]
            return head
        if len(bufs) > len(self.free):
            raise ValueError("mock: out of descriptors")
        ids = [self.free.pop(0) for _ in bufs]
        for n, (i, (gpa, length, w)) in enumerate(zip(ids, bufs, strict=True)):
            last = n + 1 == len(ids)
            flags = (DESC_F_WRITE if w else 0) | (0 if last else DESC_F_NEXT)
            self.write_desc(i, gpa, length, flags, 0 if last else ids[n + 1])
        self.chains[ids[0]] = ids
        return ids[0]

    def publish(self, *heads: int) -> None:
        """Put heads in the avail ring, then bump avail.idx once (§2.7.13)."""
        idx = self.avail_idx
        for h in heads:
            self.set_avail_slot(idx, h)
            idx = (idx + 1) & 0xFFFF
        self.set_avail_idx(idx)

    def take_used(self, rearm: bool = True) -> list[tuple[int, int]]:
        """New used elements (id, len) since the last call; frees their descriptors.

        With ``rearm`` the driver then asks for an interrupt on the very next
        completion (used_event = last seen used idx, §2.7.10), as Linux does
        when it re-enables callbacks.
        """
        new = self.used_idx()
        out = []
        while self.last_used != new:
            slot = self.last_used % self.size
            uid, ulen = USED_ELEM.unpack(self.mem.read(self.used_gpa + 4 + 8 * slot, 8))
            out.append((uid, ulen))
            self.free.extend(self.chains.pop(uid, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if rearm:
            self.set_used_event(self.last_used)
        return out

    # --- virtio-blk helpers ----------------------------------------------------------

    def blk_request(self, rtype: int, sector: int = 0, data: bytes | int = 0,
                    indirect: bool = False, header_split: bool = False) -> BlkRequest:
        """Build a blk chain: header, data (readable for OUT-like, writable for IN-like), status.

        ``data`` is the payload for OUT/DISCARD/WRITE_ZEROES, or a length for IN/GET_ID.
        """
        hdr = self.alloc(OUTHDR.size)
        self.mem.write(hdr, OUTHDR.pack(rtype, 0, sector))
        device_writes = rtype in (BlkType.IN, BlkType.GET_ID)
        if isinstance(data, int):
            length, payload = data, None
        else:
            length, payload = len(data), data
        buf = self.alloc(length, 512) if length else 0
        if payload:
            self.mem.write(buf, payload)
        status = self.alloc(1, 1)
        self.mem.write(status, b"\xff")
        if header_split:
            bufs = [(hdr, 8, False), (hdr + 8, 8, False)]
        else:
            bufs = [(hdr, OUTHDR.size, False)]
        if length:
            bufs.append((buf, length, device_writes))
        bufs.append((status, 1, True))
        head = self.add_chain(bufs, indirect=indirect)
        return BlkRequest(head, hdr, buf, length, status)

    def status(self, req: BlkRequest) -> int:
        return self.mem.read(req.status_gpa, 1)[0]

    def data(self, req: BlkRequest) -> bytes:
        return self.mem.read(req.data_gpa, req.data_len)


def segments(*segs: tuple[int, int, int]) -> bytes:
    """DISCARD/WRITE_ZEROES payload from (sector, num_sectors, flags) triples."""
    return b"".join(SEGMENT.pack(*s) for s in segs)


@dataclass
class QueueFds:
    """The eventfds a front-end owns for one queue."""

    kick: int
    call: int
    err: int

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            os.close(fd)


class MockFrontend:
    """Plays QEMU on a real unix socket with real fds (tests and tooling).

    It speaks the same sequence QEMU 7.2 uses for vhost-user-blk (see
    VHOST_USER.md "Sequence"), so the server under test sees exactly the
    messages, fds and shared memory a real front-end would send.
    """

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)  # blocking: waits if the backlog is momentarily full
        self.sock.settimeout(timeout)
        self.queue_fds: list[QueueFds] = []

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
             need_reply: bool = False) -> None:
        flags = VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
        msg = encode_message(request, payload, flags)
        if fds:
            socket.send_fds(self.sock, [msg], list(fds))
        else:
            self.sock.sendall(msg)

    def recv(self) -> tuple[int, int, bytes, list[int]]:
        """One reply: (request, flags, payload, fds)."""
        data, fds, _flags, _ = socket.recv_fds(self.sock, HEADER.size, MAX_FDS)
        if not data:
            raise EOFError("backend closed the connection")
        while len(data) < HEADER.size:
            data += self.sock.recv(HEADER.size - len(data))
        request, flags, size = HEADER.unpack(data)
        payload = b""
        while len(payload) < size:
            chunk = self.sock.recv(size - len(payload))
            if not chunk:
                raise EOFError("backend closed the connection mid-reply")
            payload += chunk
        return request, flags, payload, list(fds)

    def call(self, request: int, payload: bytes = b"") -> bytes:
        """Send a request that always gets a reply; return the reply payload."""
        self.send(request, payload)
        rreq, flags, body, fds = self.recv()
        for fd in fds:
            os.close(fd)
        if rreq != request or flags != VERSION | HeaderFlag.REPLY:
            raise AssertionError(f"bad reply header {rreq} flags {flags:#x} to {request}")
        return body

    def ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """Send with NEED_REPLY (REPLY_ACK negotiated) and return the u64 status."""
        self.send(request, payload, fds, need_reply=True)
        _req, _flags, body, _ = self.recv()
        return int(U64.unpack(body)[0])

    def get_u64(self, request: int) -> int:
        return int(U64.unpack(self.call(request))[0])

    def realize(self, protocol_features: int | None = None) -> tuple[int, int]:
        """The realize-time sequence; returns (features, protocol features) offered."""
        features = self.get_u64(Request.GET_FEATURES)
        pf = self.get_u64(Request.GET_PROTOCOL_FEATURES)
        chosen = pf if protocol_features is None else protocol_features & pf
        self.send(Request.SET_PROTOCOL_FEATURES, U64.pack(chosen))
        self.protocol_features = chosen
        return features, pf

    def start(self, mem: MockMemory, queues: Sequence[MockSplitQueue], features: int) -> None:
        """SET_FEATURES, SET_MEM_TABLE, per-queue NUM/BASE/ADDR/KICK/CALL/ERR, ENABLE."""
        self.send(Request.SET_OWNER)
        self.send(Request.SET_FEATURES, U64.pack(features))
        self.set_mem_table(mem)
        for i, q in enumerate(queues):
            fds = QueueFds(os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK),
                           os.eventfd(0, os.EFD_NONBLOCK))
            self.queue_fds.append(fds)
            self.send(Request.SET_VRING_ERR, U64.pack(i), [fds.err])
            self.send(Request.SET_VRING_NUM, VRING_STATE.pack(i, q.size))
            # QEMU sends the device's last_avail_idx; for a fresh or replayed ring
            # that is where the used ring stands.
            self.send(Request.SET_VRING_BASE, VRING_STATE.pack(i, q.last_used))
            self.send(Request.SET_VRING_ADDR, encode_vring_addr(q.vring_addr(i)))
            self.send(Request.SET_VRING_KICK, U64.pack(i), [fds.kick])
            self.send(Request.SET_VRING_CALL, U64.pack(i), [fds.call])
        for i in range(len(queues)):
            self.send(Request.SET_VRING_ENABLE, VRING_STATE.pack(i, 1))

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are (adversarial tests: a partial or malformed message)."""
        self.sock.sendall(data)

    def set_vring_fd(self, request: int, index: int, fd: int) -> None:
        """SET_VRING_KICK/CALL/ERR with an fd of the test's choosing (a pipe, a file)."""
        self.send(request, U64.pack(index), [fd])

    def set_mem_table(self, mem: MockMemory) -> None:
        self.send(Request.SET_MEM_TABLE, encode_mem_table(mem.regions), [mem.fd] * len(mem.regions))

    def kick(self, index: int = 0) -> None:
        os.eventfd_write(self.queue_fds[index].kick, 1)

    def wait_call(self, index: int = 0, timeout: float = 5.0) -> int:
        """Wait for the backend to signal the call eventfd; returns the counter."""
        fd = self.queue_fds[index].call
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no call on queue {index} within {timeout}s")
        return os.eventfd_read(fd)

    def err_count(self, index: int = 0) -> int:
        try:
            return os.eventfd_read(self.queue_fds[index].err)
        except BlockingIOError:
            return 0

    def get_vring_base(self, index: int = 0) -> int:
        body = self.call(Request.GET_VRING_BASE, VRING_STATE.pack(index, 0))
        return int(VRING_STATE.unpack(body)[1])

    def close(self) -> None:
        self.sock.close()
        for fds in self.queue_fds:
            fds.close()
        self.queue_fds = []

    def __enter__(self) -> MockFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
