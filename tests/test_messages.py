"""The vhost-user codec: payload round trips and every rejection path of
``check_header``/``decode`` (and the socket reader ``Channel``), including
closing the fds that came with a rejected message."""

from __future__ import annotations

import array
import os
import re
import socket
import struct
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from vhd_helpers import fd_is_closed, open_fds
from vhostd.fds import OwnedFd
from vhostd.protocol.channel import Channel, Disconnected
from vhostd.protocol.constants import (
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD,
    VRING_NOFD_MASK,
    HeaderFlag,
    Request,
)
from vhostd.protocol.messages import (
    REGION_SIZE,
    SPECS,
    Config,
    Fds,
    Header,
    MemRegion,
    Message,
    MemRegMsg,
    MemTable,
    PayloadKind,
    ProtocolError,
    U64,
    VringAddr,
    VringState,
    check_header,
    decode,
    describe,
    encode_reply,
    encode_request,
    vring_index_of,
)

pytestmark = pytest.mark.usefixtures("watchdog")

V = int(HeaderFlag.VERSION)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def mkfds(n: int) -> list[OwnedFd]:
    return [OwnedFd(os.eventfd(0, os.EFD_CLOEXEC)) for _ in range(n)]


def reject(header: Header, payload: bytes, nfds: int = 0) -> ProtocolError:
    """decode() must raise ProtocolError and close every fd it was given."""
    fds = mkfds(nfds)
    raw = [f.fileno() for f in fds]
    with pytest.raises(ProtocolError) as ei:
        decode(header, payload, fds)
    assert all(f.closed for f in fds)
    for fd in raw:
        assert fd_is_closed(fd), f"fd {fd} of a rejected message left open"
    return ei.value


# --- payload round trips ---------------------------------------------------------

regions = st.builds(MemRegion, u64, u64, u64, u64)
mem_tables = st.builds(MemTable, st.lists(regions, max_size=MAX_MEM_REGIONS).map(tuple))
configs = st.builds(lambda o, f, d: Config(o, len(d), f, d), u32, u32,
                    st.binary(max_size=MAX_CONFIG_SIZE))
payloads = {
    PayloadKind.U64: st.builds(U64, u64),
    PayloadKind.VRING_STATE: st.builds(VringState, u32, u32),
    PayloadKind.VRING_ADDR: st.builds(VringAddr, u32, u32, u64, u64, u64, u64),
    PayloadKind.MEM_TABLE: mem_tables,
    PayloadKind.MEM_REG: st.builds(MemRegMsg, regions),
    PayloadKind.CONFIG: configs,
}


@given(st.builds(U64, u64))
def test_u64_round_trip(p: U64) -> None:
    data = p.pack()
    assert data == struct.pack("<Q", p.value)
    assert U64.unpack(data) == p


@given(st.builds(VringState, u32, u32))
def test_vring_state_round_trip(p: VringState) -> None:
    data = p.pack()
    assert data == struct.pack("<II", p.index, p.num)
    assert VringState.unpack(data) == p


@given(payloads[PayloadKind.VRING_ADDR])
def test_vring_addr_round_trip(p: VringAddr) -> None:
    data = p.pack()
    assert len(data) == 40
    # Wire order is desc, used, avail (vhost-user.rst), not the field order one might guess.
    assert struct.unpack("<IIQQQQ", data) == (p.index, p.flags, p.desc_user_addr,
                                              p.used_user_addr, p.avail_user_addr, p.log_guest_addr)
    assert VringAddr.unpack(data) == p


@given(regions)
def test_mem_region_round_trip(r: MemRegion) -> None:
    data = r.pack()
    assert len(data) == REGION_SIZE == 32
    assert MemRegion.unpack(data) == r


@given(mem_tables)
def test_mem_table_round_trip(t: MemTable) -> None:
    data = t.pack()
    assert len(data) == 8 + 32 * len(t.regions)
    assert struct.unpack_from("<II", data) == (len(t.regions), 0)
    assert MemTable.unpack(data) == t


@given(regions)
def test_mem_reg_round_trip(r: MemRegion) -> None:
    data = MemRegMsg(r).pack()
    assert len(data) == 40 and data[:8] == bytes(8)     # u64 padding, then the region
    assert MemRegMsg.unpack(data) == MemRegMsg(r)


def test_rem_mem_reg_closes_an_fd_it_may_carry() -> None:
    """vhost-user.rst: no fd SHOULD come; one that does MUST be closed unused."""
    raw = MemRegMsg(MemRegion(0x1000, 0x1000, 0x7000, 0)).pack()
    fds = mkfds(1)
    msg = decode(Header(Request.REM_MEM_REG, V, len(raw)), raw, fds)
    assert msg.fds == [] and fds[0].closed
    e = reject(Header(Request.REM_MEM_REG, V, len(raw)), raw, nfds=2)
    assert e.reason == "carries 2 fds, expected 0"
    e = reject(Header(Request.ADD_MEM_REG, V, len(raw)), raw, nfds=0)
    assert e.reason == "carries 0 fds, expected 1"


@given(configs)
def test_config_round_trip(c: Config) -> None:
    data = c.pack()
    assert len(data) == 12 + c.size
    assert Config.unpack(data) == c


@given(st.data())
def test_every_accepted_request_round_trips_through_decode(data: st.DataObject) -> None:
    request = data.draw(st.sampled_from(sorted(SPECS)))
    spec = SPECS[request]
    need_reply = data.draw(st.booleans())
    body: Any
    if spec.payload is PayloadKind.NONE:
        body, raw = None, b""
    elif spec.fds is Fds.VRING:
        body = U64(data.draw(st.integers(0, 0xFF)) | data.draw(st.sampled_from([0, VRING_NOFD_MASK])))
        raw = body.pack()
    elif spec.payload in payloads:
        body = data.draw(payloads[spec.payload])
        raw = body.pack()
    else:   # any other fixed-size payload: whatever unpacks must pack back the same
        cls = spec.payload.value
        body = cls.unpack(cls.unpack(data.draw(st.binary(min_size=cls._S.size, max_size=cls._S.size))).pack())
        raw = body.pack()
    if spec.fds is Fds.VRING:
        assert isinstance(body, U64)
        nfds = 0 if body.value & VRING_NOFD_MASK else 1
    elif spec.fds is Fds.PER_REGION:
        assert isinstance(body, MemTable)
        nfds = len(body.regions)
    else:
        nfds = 1 if spec.fds is Fds.ONE else 0     # Fds.OPTIONAL: none
    wire = encode_request(request, raw, need_reply)
    header = Header.unpack(wire[:HEADER_SIZE])
    assert header == Header(request, V | (HeaderFlag.NEED_REPLY if need_reply else 0), len(raw))
    fds = mkfds(nfds)
    try:
        msg = decode(header, wire[HEADER_SIZE:], fds)
        assert msg.request is request
        assert msg.payload == body
        assert msg.need_reply is need_reply
        assert msg.fds == fds and not any(f.closed for f in fds)
    finally:
        for f in fds:
            f.close()


def test_header_layout() -> None:
    h = Header(Request.GET_CONFIG, V | HeaderFlag.NEED_REPLY, 268)
    assert h.pack() == struct.pack("<III", 24, 0x9, 268)
    assert Header.unpack(h.pack()) == h
    assert h.need_reply and not Header(1, V, 0).need_reply


def test_encode_reply_sets_the_reply_flag_and_is_refused_as_a_request() -> None:
    wire = encode_reply(Request.GET_FEATURES, U64(7).pack())
    h = Header.unpack(wire[:HEADER_SIZE])
    assert h == Header(Request.GET_FEATURES, V | HeaderFlag.REPLY, 8)
    assert U64.unpack(wire[HEADER_SIZE:]).value == 7
    e = reject(Header(Request.GET_FEATURES, V | HeaderFlag.REPLY, 0), b"")
    assert e.reason == "reply flag set on a request"


# --- rejections: header ------------------------------------------------------------

@pytest.mark.parametrize("number", [0, 41, 99, 2**32 - 1])
def test_unknown_request(number: int) -> None:
    with pytest.raises(ProtocolError) as ei:
        check_header(Header(number, V, 0))
    assert ei.value.request == number and ei.value.reason == "unknown request"
    assert str(ei.value) == f"request {number}: unknown request"
    e = reject(Header(number, V, 0), b"", nfds=2)
    assert e.request == number


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x8, 0x2 | 0x8])
def test_bad_version_bits(flags: int) -> None:
    e = reject(Header(Request.GET_FEATURES, flags, 0), b"", nfds=1)
    assert e.request is Request.GET_FEATURES
    assert e.reason == f"unsupported version in flags {flags:#x}"


@pytest.mark.parametrize("flags", [V | 0x4, V | 0x4 | 0x8])
def test_reply_flag_on_a_request(flags: int) -> None:
    e = reject(Header(Request.SET_OWNER, flags, 0), b"")
    assert e.request is Request.SET_OWNER and e.reason == "reply flag set on a request"


UNSUPPORTED = sorted(set(Request) - set(SPECS))


def test_unsupported_list_is_what_we_expect() -> None:
    assert Request.SET_LOG_BASE not in UNSUPPORTED and Request.SET_LOG_FD not in UNSUPPORTED
    assert Request.SET_VRING_ENDIAN in UNSUPPORTED and Request.POSTCOPY_ADVISE in UNSUPPORTED
    assert Request.ADD_MEM_REG not in UNSUPPORTED and Request.REM_MEM_REG not in UNSUPPORTED
    assert Request.VRING_KICK in UNSUPPORTED
    assert Request.GET_CONFIG not in UNSUPPORTED


@pytest.mark.parametrize("request_", UNSUPPORTED, ids=lambda r: r.name)
def test_known_but_unsupported_request(request_: Request) -> None:
    e = reject(Header(request_, V, 8), bytes(8), nfds=1)
    assert e.request is request_
    assert e.reason == "request not supported by this back-end"
    assert str(e) == f"VHOST_USER_{request_.name}: request not supported by this back-end"


BAD_SIZES: dict[PayloadKind, list[int]] = {
    PayloadKind.NONE: [1, 8],
    PayloadKind.U64: [0, 4, 7, 9, 16],
    PayloadKind.VRING_STATE: [0, 4, 7, 9, 12],
    PayloadKind.VRING_ADDR: [0, 8, 39, 41, 48],
    PayloadKind.MEM_TABLE: [0, 4, 7, 8 + 8 * 32 + 1, 8 + 9 * 32],
    PayloadKind.CONFIG: [0, 8, 11, 12 + 256 + 1],
}


for _kind in PayloadKind:   # payloads added later: fixed size, so one byte less or more is wrong
    if _kind not in BAD_SIZES and _kind.value is not None:
        BAD_SIZES[_kind] = [0, _kind.value._S.size - 1, _kind.value._S.size + 1]


@pytest.mark.parametrize("request_,size", [(r, s) for r in sorted(SPECS) for s in BAD_SIZES[SPECS[r].payload]],
                         ids=lambda x: x.name if isinstance(x, Request) else str(x))
def test_wrong_payload_size(request_: Request, size: int) -> None:
    with pytest.raises(ProtocolError) as ei:
        check_header(Header(request_, V, size))
    assert ei.value.request is request_
    assert ei.value.reason == f"payload size {size} is invalid for this request"
    e = reject(Header(request_, V, size), bytes(size), nfds=1)
    assert e.reason == ei.value.reason


@pytest.mark.parametrize("have", [0, 7, 9])
def test_payload_shorter_or_longer_than_header_says(have: int) -> None:
    e = reject(Header(Request.SET_FEATURES, V, 8), bytes(have))
    assert e.request is Request.SET_FEATURES
    assert e.reason == f"got {have} payload bytes, header says 8"


# --- rejections: payload contents ---------------------------------------------------

def table_bytes(n_claimed: int, n_present: int) -> bytes:
    return struct.pack("<II", n_claimed, 0) + b"".join(
        MemRegion(0x1000 * i, 0x1000, 0x7F00_0000_0000 + 0x1000 * i, 0).pack() for i in range(n_present))


def test_mem_table_more_than_8_regions() -> None:
    raw = table_bytes(9, 8)   # the largest valid size, but claims 9 regions
    e = reject(Header(Request.SET_MEM_TABLE, V, len(raw)), raw, nfds=8)
    assert e.request is Request.SET_MEM_TABLE and e.reason == "9 memory regions, at most 8"


@pytest.mark.parametrize("claimed,present", [(2, 1), (1, 2), (0, 1), (8, 7)])
def test_mem_table_size_mismatch(claimed: int, present: int) -> None:
    raw = table_bytes(claimed, present)
    e = reject(Header(Request.SET_MEM_TABLE, V, len(raw)), raw, nfds=claimed)
    assert e.reason == f"payload of {len(raw)} bytes for {claimed} regions"


def test_config_size_over_256() -> None:
    raw = struct.pack("<III", 0, 257, 0) + bytes(256)
    for request_ in (Request.GET_CONFIG, Request.SET_CONFIG):
        e = reject(Header(request_, V, len(raw)), raw, nfds=1)
        assert e.request is request_ and e.reason == "config size 257 > 256"


@pytest.mark.parametrize("size,data_len", [(4, 8), (8, 4), (256, 0), (0, 1)])
def test_config_size_mismatch(size: int, data_len: int) -> None:
    raw = struct.pack("<III", 0, size, 0) + bytes(data_len)
    e = reject(Header(Request.GET_CONFIG, V, len(raw)), raw)
    assert e.reason == f"payload of {len(raw)} bytes for {size} config bytes"


# --- rejections: fd counts ------------------------------------------------------------

NO_FD_REQUESTS = sorted(r for r, s in SPECS.items() if s.fds is Fds.NONE)


@pytest.mark.parametrize("request_", NO_FD_REQUESTS, ids=lambda r: r.name)
@pytest.mark.parametrize("nfds", [1, 3])
def test_fds_on_a_message_that_takes_none(request_: Request, nfds: int) -> None:
    size = {PayloadKind.NONE: 0, PayloadKind.CONFIG: 12}.get(SPECS[request_].payload)
    if size is None:
        payload = SPECS[request_].payload.value
        assert payload is not None
        size = payload._S.size
    e = reject(Header(request_, V, size), bytes(size), nfds=nfds)
    assert e.request is request_ and e.reason == f"carries {nfds} fds, expected 0"


@pytest.mark.parametrize("regions,nfds", [(2, 1), (2, 0), (2, 3), (0, 1), (8, 7)])
def test_set_mem_table_fd_count_must_match_regions(regions: int, nfds: int) -> None:
    raw = table_bytes(regions, regions)
    e = reject(Header(Request.SET_MEM_TABLE, V, len(raw)), raw, nfds=nfds)
    assert e.request is Request.SET_MEM_TABLE
    assert e.reason == f"carries {nfds} fds, expected {regions}"


VRING_FD_REQUESTS = [Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]


@pytest.mark.parametrize("request_", VRING_FD_REQUESTS, ids=lambda r: r.name)
def test_vring_fd_request_with_nofd_bit_and_an_fd(request_: Request) -> None:
    e = reject(Header(request_, V, 8), U64(VRING_NOFD_MASK | 1).pack(), nfds=1)
    assert e.request is request_ and e.reason == "carries 1 fds, expected 0"


@pytest.mark.parametrize("request_", VRING_FD_REQUESTS, ids=lambda r: r.name)
@pytest.mark.parametrize("nfds", [0, 2])
def test_vring_fd_request_without_nofd_bit_needs_exactly_one_fd(request_: Request, nfds: int) -> None:
    e = reject(Header(request_, V, 8), U64(0).pack(), nfds=nfds)
    assert e.reason == f"carries {nfds} fds, expected 1"


def test_accepted_message_keeps_its_fds_open() -> None:
    fds = mkfds(2)
    raw = table_bytes(2, 2)
    msg = decode(Header(Request.SET_MEM_TABLE, V, len(raw)), raw, fds)
    assert msg.fds == fds
    for f in fds:
        os.fstat(f.fileno())   # still open
        f.close()


def test_vring_index_of() -> None:
    assert vring_index_of(U64(5)) == (5, False)
    assert vring_index_of(U64(0xFF | VRING_NOFD_MASK)) == (0xFF, True)
    for bad in (0x200, 1 << 63, 0x1FF | 0x400):
        with pytest.raises(ValueError, match="reserved bits"):
            vring_index_of(U64(bad))


def test_describe() -> None:
    assert describe(None) == "message"
    assert describe(Request.SET_MEM_TABLE) == "VHOST_USER_SET_MEM_TABLE"
    assert describe(5) == "VHOST_USER_SET_MEM_TABLE"
    assert describe(1000) == "request 1000"


# --- property: anything at all is either a message or a ProtocolError ------------------

request_numbers = st.one_of(st.sampled_from([int(r) for r in Request] + [0, 41, 255]), u32)
header_flags = st.one_of(st.sampled_from([1, 0, 2, 3, 5, 9, 0xD, 0x101]), u32)


@settings(max_examples=400)
@given(request_numbers, header_flags, st.one_of(st.integers(0, 300), u32), st.binary(max_size=300),
       st.integers(0, 3), st.booleans())
def test_random_messages_raise_only_protocol_error(request_: int, flags: int, size: int,
                                                   payload: bytes, nfds: int, honest_size: bool) -> None:
    if honest_size:
        size = len(payload)
    header = Header.unpack(struct.pack("<III", request_, flags, size))
    fds = mkfds(nfds)
    raw = [f.fileno() for f in fds]
    try:
        msg = decode(header, payload, fds)
    except ProtocolError as e:
        assert e.request is None or int(e.request) == request_
        assert all(fd_is_closed(fd) for fd in raw)
        return
    try:
        # Whatever was accepted is well-formed: it re-encodes to a payload of
        # the same size that decodes to the same value (padding aside).
        assert msg.request == request_ and request_ in SPECS
        assert flags & 0x7 == V and len(payload) == size
        if msg.payload is None:
            assert payload == b""
        else:
            body = msg.payload.pack()
            assert len(body) == len(payload)
            assert type(msg.payload).unpack(body) == msg.payload
        assert msg.fds == fds
    finally:
        for f in fds:
            f.close()


@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE + 64), st.integers(0, 2))
def test_random_raw_bytes_raise_only_protocol_error(data: bytes, nfds: int) -> None:
    header = Header.unpack(data[:HEADER_SIZE])
    fds = mkfds(nfds)
    try:
        msg = decode(header, data[HEADER_SIZE:], fds)
    except ProtocolError:
        assert all(f.closed for f in fds)
    else:
        assert msg.request in SPECS
        for f in fds:
            f.close()


# --- Channel: reading messages from a socket -------------------------------------------

def run_channel(chunks: list[tuple[bytes, list[int]]], close: bool = True) -> Exception | Message:
    """Sends chunks (data, fds) to a Channel and returns what recv() gave or raised."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    async def main() -> Exception | Message:
        chan = Channel(trio.socket.from_stdlib_socket(b))
        for data, fds in chunks:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
            a.sendmsg([data], anc)
        if close:
            a.close()
        try:
            with trio.fail_after(5):
                return await chan.recv()
        except (ProtocolError, Disconnected) as e:
            return e

    try:
        return trio.run(main)
    finally:
        a.close()
        b.close()


def test_channel_reads_a_message_sent_in_pieces_with_its_fds() -> None:
    r, w = os.pipe()
    try:
        wire = encode_request(Request.SET_VRING_KICK, U64(3).pack())
        msg = run_channel([(wire[:5], [r]), (wire[5:13], []), (wire[13:], [])])
        assert not isinstance(msg, Exception)
        assert msg.request is Request.SET_VRING_KICK and msg.payload == U64(3)
        (fd,) = msg.fds
        assert os.path.samestat(os.fstat(fd.fileno()), os.fstat(r))
        fd.close()
    finally:
        os.close(r)
        os.close(w)


def test_channel_disconnect_at_message_boundary() -> None:
    assert isinstance(run_channel([]), Disconnected)


def test_channel_closed_inside_header_or_payload() -> None:
    e = run_channel([(encode_request(Request.GET_FEATURES)[:7], [])])
    assert isinstance(e, ProtocolError) and e.reason == "connection closed inside a message header"
    e = run_channel([(encode_request(Request.SET_FEATURES, U64(1).pack())[:15], [])])
    assert isinstance(e, ProtocolError) and e.reason == "connection closed inside a message payload"


def test_channel_rejects_an_oversized_payload_before_reading_it() -> None:
    e = run_channel([(Header(Request.SET_FEATURES, V, MAX_PAYLOAD + 1).pack(), [])], close=False)
    assert isinstance(e, ProtocolError)
    assert e.reason == f"payload size {MAX_PAYLOAD + 1} > {MAX_PAYLOAD}"


def test_channel_rejects_bad_header_before_reading_payload() -> None:
    # Only the header is sent and the socket stays open: a reader that waited
    # for the 8 payload bytes would time out instead.
    e = run_channel([(Header(Request.SET_VRING_ENDIAN, V, 8).pack(), [])], close=False)
    assert isinstance(e, ProtocolError) and e.reason == "request not supported by this back-end"


TRUNCATED = "too many fds attached (control data truncated)"


@pytest.mark.parametrize("nfds,reason", [
    (9, "carries 9 fds, expected 8"),
    (10, "carries 10 fds, expected 8"),   # still fits the control buffer (8-byte alignment)
    (11, TRUNCATED),
    (16, TRUNCATED),
])
def test_channel_too_many_fds_closes_all_received(nfds: int, reason: str) -> None:
    ram = [os.memfd_create("t", os.MFD_CLOEXEC) for _ in range(nfds)]
    try:
        raw = table_bytes(8, 8)
        before = open_fds()
        e = run_channel([(encode_request(Request.SET_MEM_TABLE, raw), ram)])
        assert isinstance(e, ProtocolError)
        assert e.reason == reason
        assert e.request == Request.SET_MEM_TABLE   # named in the log line
        assert open_fds() == before, "fds of a rejected message leaked"
    finally:
        for fd in ram:
            os.close(fd)


@pytest.mark.parametrize("wire,nfds,reason", [
    (Header(Request.GET_FEATURES, V, 0).pack(), 2, "carries 2 fds, expected 0"),
    (Header(99, V, 0).pack(), 1, "unknown request"),
    (Header(Request.SET_VRING_ENDIAN, V, 8).pack() + bytes(8), 1, "request not supported by this back-end"),
    (encode_request(Request.SET_FEATURES, U64(0).pack())[:16], 1, "connection closed inside a message payload"),
])
def test_channel_closes_fds_of_rejected_messages(wire: bytes, nfds: int, reason: str) -> None:
    mine = [os.eventfd(0) for _ in range(nfds)]
    try:
        before = open_fds()
        e = run_channel([(wire, mine)])
        assert isinstance(e, ProtocolError) and e.reason == reason
        assert open_fds() == before
    finally:
        for fd in mine:
            os.close(fd)


def test_channel_error_names_the_request_when_known() -> None:
    e = run_channel([(encode_request(Request.SET_FEATURES, U64(1).pack())[:15], [])])
    assert isinstance(e, ProtocolError)
    assert re.search("SET_FEATURES", str(e)), str(e)
