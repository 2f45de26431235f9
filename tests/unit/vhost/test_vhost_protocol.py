"""Message codec: round trips, and every malformed shape is a ProtocolError."""

from __future__ import annotations

import pytest

from pytest_virtio.errors import ProtocolError
from pytest_virtio.vhost_user import protocol as p
from pytest_virtio.vhost_user.protocol import Request


def test_header_round_trip_and_reply_flags() -> None:
    raw = p.encode_reply(Request.GET_FEATURES, p.encode_u64(7))
    h = p.decode_header(raw[:12])
    assert (h.request, h.flags, h.size) == (Request.GET_FEATURES, 0x5, 8)
    assert p.decode_u64(raw[12:]) == 7
    assert not h.need_reply
    assert p.decode_header(p.HEADER.pack(1, 0x9, 0)).need_reply


@pytest.mark.parametrize("raw", [b"", b"\x01" * 11, b"\x01" * 13])
def test_header_wrong_length(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.decode_header(raw)


def test_header_bad_version_and_oversize() -> None:
    with pytest.raises(ProtocolError, match="version"):
        p.decode_header(p.HEADER.pack(1, 0x2, 0))
    with pytest.raises(ProtocolError, match="exceeds"):
        p.decode_header(p.HEADER.pack(1, 0x1, p.MAX_PAYLOAD + 1))


def test_unknown_request() -> None:
    with pytest.raises(ProtocolError, match="unknown"):
        p.request_of(p.decode_header(p.HEADER.pack(999, 1, 0)))


def test_struct_sizes_match_spec() -> None:
    assert p.HEADER.size == 12
    assert p.VRING_ADDR.size == 40
    assert p.MEM_REGION.size == 32
    assert p.INFLIGHT.size == 24
    assert p.CONFIG_HDR.size == 12


def test_vring_round_trips() -> None:
    st = p.VringState(3, 256)
    assert p.decode_vring_state(p.encode_vring_state(st)) == st
    addr = p.VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0)
    raw = p.encode_vring_addr(addr)
    # used precedes avail on the wire
    assert p.VRING_ADDR.unpack(raw)[3] == 0x3000
    assert p.decode_vring_addr(raw) == addr
    vf = p.VringFile(5, True)
    assert p.decode_vring_file(p.encode_vring_file(vf)) == vf


def test_vring_file_reserved_bits() -> None:
    with pytest.raises(ProtocolError, match="reserved"):
        p.decode_vring_file(p.encode_u64(1 << 20))


def test_mem_table_round_trip() -> None:
    regions = [p.MemRegion(0, 0xA0000, 0x7F0000000000, 0),
               p.MemRegion(0xC0000, 0x100000, 0x7F00000C0000, 0xC0000)]
    raw = p.encode_mem_table(regions)
    p.check_payload_size(Request.SET_MEM_TABLE, raw)
    assert p.decode_mem_table(raw) == regions


@pytest.mark.parametrize("n", [0, 9])
def test_mem_table_region_count(n: int) -> None:
    raw = p.MEM_TABLE_HDR.pack(n, 0) + bytes(32 * n)
    with pytest.raises(ProtocolError, match="regions"):
        p.check_payload_size(Request.SET_MEM_TABLE, raw)


def test_mem_table_truncated_and_overflow() -> None:
    raw = p.encode_mem_table([p.MemRegion(0, 4096, 0, 0)])
    with pytest.raises(ProtocolError):
        p.check_payload_size(Request.SET_MEM_TABLE, raw[:-1])
    with pytest.raises(ProtocolError):
        p.check_payload_size(Request.SET_MEM_TABLE, raw[:4])
    over = p.encode_mem_table([p.MemRegion(2**64 - 4096, 8192, 0, 0)])
    with pytest.raises(ProtocolError, match="overflow"):
        p.decode_mem_table(over)
    zero = p.encode_mem_table([p.MemRegion(0, 0, 0, 0)])
    with pytest.raises(ProtocolError, match="size 0"):
        p.decode_mem_table(zero)


@pytest.mark.parametrize(
    ("request_", "size"),
    [
        (Request.GET_FEATURES, 8),
        (Request.SET_FEATURES, 4),
        (Request.SET_VRING_NUM, 12),
        (Request.SET_VRING_ADDR, 39),
        (Request.SET_VRING_KICK, 0),
        (Request.GET_INFLIGHT_FD, 20),
        (Request.SET_OWNER, 1),
    ],
)
def test_payload_size_per_type(request_: Request, size: int) -> None:
    with pytest.raises(ProtocolError):
        p.check_payload_size(request_, bytes(size))


def test_unsupported_request_payload() -> None:
    with pytest.raises(ProtocolError, match="not supported"):
        p.check_payload_size(Request.SET_LOG_BASE, bytes(16))


def test_config_round_trip_and_limits() -> None:
    cfg = p.ConfigSpace(0, 60, 0, bytes(range(60)))
    raw = p.encode_config(cfg)
    p.check_payload_size(Request.GET_CONFIG, raw)
    assert p.decode_config(raw) == cfg
    with pytest.raises(ProtocolError):
        p.check_payload_size(Request.GET_CONFIG, p.CONFIG_HDR.pack(0, 300, 0) + bytes(300))
    with pytest.raises(ProtocolError, match="beyond"):
        p.decode_config(p.CONFIG_HDR.pack(250, 10, 0) + bytes(10))
    with pytest.raises(ProtocolError):
        p.decode_config(p.CONFIG_HDR.pack(0, 10, 0) + bytes(9))


def test_inflight_round_trip() -> None:
    inf = p.Inflight(4096, 0, 2, 128)
    assert p.decode_inflight(p.encode_inflight(inf)) == inf


@pytest.mark.parametrize(
    ("request_", "payload", "nfds", "ok"),
    [
        (Request.SET_VRING_KICK, p.encode_u64(0), 1, True),
        (Request.SET_VRING_KICK, p.encode_u64(0), 0, False),
        (Request.SET_VRING_KICK, p.encode_u64(0x100), 0, True),
        (Request.SET_VRING_CALL, p.encode_u64(0x100), 1, False),
        (Request.SET_VRING_ERR, p.encode_u64(0), 2, False),
        (Request.SET_FEATURES, p.encode_u64(0), 1, False),
        (Request.SET_INFLIGHT_FD, bytes(24), 1, True),
        (Request.SET_INFLIGHT_FD, bytes(24), 0, False),
        (Request.SET_MEM_TABLE, p.encode_mem_table([p.MemRegion(0, 1, 0, 0)] * 2), 2, True),
        (Request.SET_MEM_TABLE, p.encode_mem_table([p.MemRegion(0, 1, 0, 0)] * 2), 1, False),
    ],
)
def test_fd_count_per_type(request_: Request, payload: bytes, nfds: int, ok: bool) -> None:
    if ok:
        p.check_fd_count(request_, payload, nfds)
    else:
        with pytest.raises(ProtocolError, match="fds"):
            p.check_fd_count(request_, payload, nfds)


def test_flags_are_intflags() -> None:
    assert p.ProtocolFeature.CONFIG == 1 << 9
    assert p.BlkFeature.WRITE_ZEROES == 1 << 14
    assert p.TransportFeature.VERSION_1 == 1 << 32
    assert p.HeaderFlag.REPLY | p.HeaderFlag.VERSION_1 == 5
