"""vhost-user message codec: bytes in, typed values out, and back.  No I/O.

Layouts follow QEMU ``docs/interop/vhost-user.rst`` ("Message format",
"Message types").  Every layout is one precompiled :class:`struct.Struct`
(all little-endian: the protocol is host-endian and we only run on x86/arm
little-endian hosts).  Everything decoded here comes from another process, so
every size and every fd count is checked against the message type before a
single field is trusted; any violation raises :class:`ProtocolError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from pytest_virtio.errors import ProtocolError

__all__ = [
    "ALWAYS_REPLY",
    "CONFIG_HDR",
    "HEADER",
    "HEADER_SIZE",
    "INFLIGHT",
    "MAX_CONFIG_SIZE",
    "MAX_FDS",
    "MAX_PAYLOAD",
    "MAX_REGIONS",
    "MEM_REGION",
    "MEM_TABLE_HDR",
    "U64",
    "VERSION",
    "VRING_ADDR",
    "VRING_FD_INDEX_MASK",
    "VRING_FD_NOFD",
    "VRING_STATE",
    "BlkFeature",
    "BlkStatus",
    "BlkType",
    "ConfigSpace",
    "Header",
    "HeaderFlag",
    "Inflight",
    "MemRegion",
    "ProtocolFeature",
    "Request",
    "TransportFeature",
    "VringAddr",
    "VringFile",
    "VringState",
    "check_fd_count",
    "check_payload_size",
    "decode_config",
    "decode_header",
    "decode_inflight",
    "decode_mem_table",
    "decode_u64",
    "decode_vring_addr",
    "decode_vring_file",
    "decode_vring_state",
    "encode_config",
    "encode_inflight",
    "encode_mem_table",
    "encode_message",
    "encode_reply",
    "encode_u64",
    "encode_vring_addr",
    "encode_vring_file",
    "encode_vring_state",
    "request_of",
]


class Request(IntEnum):
    """Front-end request codes (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class HeaderFlag(IntFlag):
    """Header ``flags`` word (vhost-user.rst "Header"): version in bits 0-1."""

    VERSION_1 = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


class TransportFeature(IntFlag):
    """Device-independent virtio feature bits (virtio 1.2 §6) that vhost-user uses."""

    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30  # vhost-user.rst: VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 1 << 32
    RING_PACKED = 1 << 34


class BlkFeature(IntFlag):
    """virtio-blk feature bits (virtio 1.2 §5.2.3)."""

    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14


class ProtocolFeature(IntFlag):
    """vhost-user protocol feature bits (vhost-user.rst "Protocol features")."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


# --- layouts ---------------------------------------------------------------

HEADER = struct.Struct("<III")  # request, flags, size
HEADER_SIZE = HEADER.size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
MEM_TABLE_HDR = struct.Struct("<II")  # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")  # gpa, size, uva, mmap_offset
CONFIG_HDR = struct.Struct("<III")  # offset, size, flags
INFLIGHT = struct.Struct("<QQHH4x")  # mmap_size, mmap_offset, num_queues, queue_size

VERSION = 0x1
VERSION_MASK = 0x3
MAX_FDS = 8
MAX_REGIONS = 8
MAX_CONFIG_SIZE = 256  # QEMU's VHOST_USER_MAX_CONFIG_SIZE
MAX_PAYLOAD = CONFIG_HDR.size + MAX_CONFIG_SIZE  # largest payload any message we take has
VRING_FD_INDEX_MASK = 0xFF
VRING_FD_NOFD = 0x100

#: Requests that are answered whatever NEED_REPLY says (vhost-user.rst).
ALWAYS_REPLY = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
        Request.GET_CONFIG,
        Request.GET_INFLIGHT_FD,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
    }
)

_NO_PAYLOAD = frozenset(
    {
        Request.GET_FEATURES,
        Request.SET_OWNER,
        Request.RESET_OWNER,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.RESET_DEVICE,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
    }
)
_U64_PAYLOAD = frozenset(
    {
        Request.SET_FEATURES,
        Request.SET_PROTOCOL_FEATURES,
        Request.SET_VRING_KICK,
        Request.SET_VRING_CALL,
        Request.SET_VRING_ERR,
        Request.SET_STATUS,
    }
)
_STATE_PAYLOAD = frozenset(
    {
        Request.SET_VRING_NUM,
        Request.SET_VRING_BASE,
        Request.GET_VRING_BASE,
        Request.SET_VRING_ENABLE,
    }
)
_VRING_FD_REQUESTS = frozenset(
    {Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR}
)


@dataclass(frozen=True, slots=True)
class Header:
    """The 12-byte message header (vhost-user.rst "Header")."""

    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NEED_REPLY)


@dataclass(frozen=True, slots=True)
class VringState:
    """``struct vhost_vring_state`` (vhost-user.rst "A vring state description")."""

    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``struct vhost_vring_addr`` (vhost-user.rst "A vring address description").

    Addresses are front-end (QEMU) virtual addresses; note ``used`` precedes
    ``avail`` on the wire.
    """

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True, slots=True)
class VringFile:
    """The u64 of SET_VRING_KICK/CALL/ERR: queue index in bits 0-7, bit 8 = no fd."""

    index: int
    nofd: bool


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One ``VhostUserMemoryRegion`` (vhost-user.rst "Memory region description")."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """GET/SET_CONFIG payload (vhost-user.rst "Device configuration space")."""

    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Inflight:
    """GET/SET_INFLIGHT_FD payload (vhost-user.rst "Inflight description")."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


# --- validation --------------------------------------------------------------


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Decode and sanity-check a header; the request code may be unknown."""
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"vhost-user header is {len(data)} bytes, expected {HEADER_SIZE}")
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError(
            f"vhost-user version {flags & VERSION_MASK} unsupported (flags={flags:#x})"
        )
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"vhost-user payload size {size} exceeds {MAX_PAYLOAD}")
    return Header(request, flags, size)


def _expected_size(request: Request, payload: bytes) -> int | None:
    """Payload size the request type requires, or None for variable layouts checked later."""
    if request in _NO_PAYLOAD:
        return 0
    if request in _U64_PAYLOAD:
        return U64.size
    if request in _STATE_PAYLOAD:
        return VRING_STATE.size
    if request is Request.SET_VRING_ADDR:
        return VRING_ADDR.size
    if request in (Request.GET_INFLIGHT_FD, Request.SET_INFLIGHT_FD):
        return INFLIGHT.size
    if request is Request.SET_MEM_TABLE:
        if len(payload) < MEM_TABLE_HDR.size:
            raise ProtocolError("SET_MEM_TABLE payload shorter than its header")
        (nregions, _pad) = MEM_TABLE_HDR.unpack_from(payload)
        if not 1 <= nregions <= MAX_REGIONS:
            raise ProtocolError(f"SET_MEM_TABLE with {nregions} regions (allowed 1..{MAX_REGIONS})")
        return int(MEM_TABLE_HDR.size + nregions * MEM_REGION.size)
    if request in (Request.GET_CONFIG, Request.SET_CONFIG):
        if len(payload) < CONFIG_HDR.size:
            raise ProtocolError(f"{request.name} payload shorter than its header")
        _off, size, _flags = CONFIG_HDR.unpack_from(payload)
        if size > MAX_CONFIG_SIZE:
            raise ProtocolError(f"{request.name} size {size} exceeds {MAX_CONFIG_SIZE}")
        return int(CONFIG_HDR.size + size)
    return None


def check_payload_size(request: Request, payload: bytes) -> None:
    """Reject a payload whose length does not match what ``request`` carries."""
    expected = _expected_size(request, payload)
    if expected is None:
        raise ProtocolError(f"request {request.name} is not supported by this backend")
    if len(payload) != expected:
        raise ProtocolError(
            f"{request.name} payload is {len(payload)} bytes, expected {expected}"
        )


def check_fd_count(request: Request, payload: bytes, nfds: int) -> None:
    """Reject a message that carries a different number of fds than its type needs."""
    expected = 0
    if request is Request.SET_MEM_TABLE:
        expected = MEM_TABLE_HDR.unpack_from(payload)[0]
    elif request in _VRING_FD_REQUESTS:
        expected = 0 if U64.unpack(payload)[0] & VRING_FD_NOFD else 1
    elif request is Request.SET_INFLIGHT_FD:
        expected = 1
    if nfds != expected:
        raise ProtocolError(f"{request.name} carried {nfds} fds, expected {expected}")


# --- payload decoders -----------------------------------------------------------


def decode_u64(payload: bytes) -> int:
    if len(payload) != U64.size:
        raise ProtocolError(f"u64 payload is {len(payload)} bytes")
    return int(U64.unpack(payload)[0])


def decode_vring_state(payload: bytes) -> VringState:
    if len(payload) != VRING_STATE.size:
        raise ProtocolError(f"vring state payload is {len(payload)} bytes")
    return VringState(*VRING_STATE.unpack(payload))


def decode_vring_addr(payload: bytes) -> VringAddr:
    if len(payload) != VRING_ADDR.size:
        raise ProtocolError(f"vring address payload is {len(payload)} bytes")
    return VringAddr(*VRING_ADDR.unpack(payload))


def decode_vring_file(payload: bytes) -> VringFile:
    value = decode_u64(payload)
    if value & ~(VRING_FD_INDEX_MASK | VRING_FD_NOFD):
        raise ProtocolError(f"vring fd payload has reserved bits set: {value:#x}")
    return VringFile(value & VRING_FD_INDEX_MASK, bool(value & VRING_FD_NOFD))


def decode_mem_table(payload: bytes) -> list[MemRegion]:
    """Decode SET_MEM_TABLE; checks count and that no end address overflows u64."""
    check_payload_size(Request.SET_MEM_TABLE, payload)
    (nregions, _pad) = MEM_TABLE_HDR.unpack_from(payload)
    regions = [
        MemRegion(*MEM_REGION.unpack_from(payload, MEM_TABLE_HDR.size + i * MEM_REGION.size))
        for i in range(nregions)
    ]
    limit = 1 << 64
    for r in regions:
        if r.size == 0:
            raise ProtocolError(f"memory region at gpa {r.gpa:#x} has size 0")
        if r.gpa + r.size > limit or r.uva + r.size > limit or r.mmap_offset + r.size > limit:
            raise ProtocolError(f"memory region at gpa {r.gpa:#x} overflows 64 bits")
    return regions


def decode_config(payload: bytes) -> ConfigSpace:
    if len(payload) < CONFIG_HDR.size:
        raise ProtocolError("config payload shorter than its header")
    offset, size, flags = CONFIG_HDR.unpack_from(payload)
    data = bytes(payload[CONFIG_HDR.size :])
    if len(data) != size or size > MAX_CONFIG_SIZE:
        raise ProtocolError(f"config payload carries {len(data)} bytes, header says {size}")
    if offset + size > MAX_CONFIG_SIZE:
        raise ProtocolError(f"config access {offset}+{size} beyond {MAX_CONFIG_SIZE}")
    return ConfigSpace(offset, size, flags, data)


def decode_inflight(payload: bytes) -> Inflight:
    if len(payload) != INFLIGHT.size:
        raise ProtocolError(f"inflight payload is {len(payload)} bytes")
    return Inflight(*INFLIGHT.unpack(payload))


# --- encoders ---------------------------------------------------------------


def encode_message(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    """A whole message: header followed by payload."""
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    """A back-end reply: flags are exactly version 1 | REPLY (0x5)."""
    return encode_message(request, payload, VERSION | HeaderFlag.REPLY)


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


def encode_vring_state(state: VringState) -> bytes:
    return VRING_STATE.pack(state.index, state.num)


def encode_vring_addr(addr: VringAddr) -> bytes:
    return VRING_ADDR.pack(addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log)


def encode_vring_file(vf: VringFile) -> bytes:
    return U64.pack(vf.index | (VRING_FD_NOFD if vf.nofd else 0))


def encode_mem_table(regions: list[MemRegion]) -> bytes:
    head = MEM_TABLE_HDR.pack(len(regions), 0)
    return head + b"".join(
        MEM_REGION.pack(r.gpa, r.size, r.uva, r.mmap_offset) for r in regions
    )


def encode_config(cfg: ConfigSpace) -> bytes:
    return CONFIG_HDR.pack(cfg.offset, cfg.size, cfg.flags) + cfg.data


def encode_inflight(inf: Inflight) -> bytes:
    return INFLIGHT.pack(inf.mmap_size, inf.mmap_offset, inf.num_queues, inf.queue_size)


def request_of(header: Header) -> Request:
    """The header's request as a :class:`Request`; unknown codes are a ProtocolError."""
    try:
        return Request(header.request)
    except ValueError:
        raise ProtocolError(f"unknown vhost-user request {header.request}") from None


class BlkType(IntEnum):
    """Request types (§5.2.6)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlkStatus(IntEnum):
    """Status byte values (§5.2.6)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2
