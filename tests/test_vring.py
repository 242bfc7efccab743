"""The C split-virtqueue and virtio-blk code, driven synchronously (no
socket, no worker thread) on rings built by the Python front-end in memfds."""

from __future__ import annotations

import errno
import struct
import time
from collections.abc import Callable

import pytest

from vhd_helpers import SECTOR, Rig
from vhostd._native import lib
from vhostd.frontend import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Buf,
)
from vhostd.native import RING_ERRORS, NativeBlkQueue, NativeError, NativeVring

pytestmark = pytest.mark.usefixtures("watchdog")

N, W, I = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
RigFactory = Callable[..., Rig]


def snapshot(rig: Rig) -> bytes:
    return b"".join(bytes(r.map) for r in rig.ram.regions)


def snapshot_outside_used(rig: Rig) -> bytes:
    """Guest RAM except the used ring (which the device legitimately writes);
    packed: except the descriptor ring (used descriptors) and device area."""
    data = snapshot(rig)
    base = rig.ram.regions[0].gpa
    spans = [(rig.ring.used - base, 6 + 8 * rig.num)]
    if rig.packed:
        spans = [(rig.ring.desc - base, 16 * rig.num), (rig.ring.used - base, 4)]
    for start, length in spans:
        data = data[:start] + bytes(length) + data[start + length:]
    return data


def assert_ok(rig: Rig, req: object, used_len: int, status: int = VIRTIO_BLK_S_OK) -> None:
    used = rig.ring.take_used()
    assert used == [(req.head, used_len)]   # type: ignore[attr-defined]
    assert rig.status_of(req) == status     # type: ignore[arg-type]
    assert rig.broken == 0 and rig.errors() == 0


def assert_broken(rig: Rig, code: int, handled: int = 0) -> None:
    """The ring broke with this reason: err eventfd signalled, no used element
    for the bad chain, and the bad chain is not consumed."""
    before = rig.vring.last_avail_idx
    assert rig.broken == code, f"broken={rig.broken} ({RING_ERRORS.get(rig.broken)}), want {code}"
    assert rig.errors() == 1
    assert rig.ring.used_idx() == handled
    if not rig.packed:            # packed: a ring position (checked by the packed tests)
        assert rig.vring.used_idx == handled
    assert rig.vring.last_avail_idx == before
    assert rig.vring.stats().broken_reason == RING_ERRORS[code]


def head_request(rig: Rig, type_: int = VIRTIO_BLK_T_IN, sector: int = 0) -> tuple[int, int]:
    """A header and a status buffer: (header gpa, status gpa)."""
    return rig.header(type_, sector), rig.status()


# --- well-formed requests ----------------------------------------------------------

def test_read(rig: Rig) -> None:
    req = rig.read_req(3, 4096)
    assert rig.process() == 1
    assert_ok(rig, req, 4097)
    assert rig.data_of(req) == rig.initial[3 * SECTOR: 3 * SECTOR + 4096]
    s = rig.vring.stats()
    assert (s.requests, s.bytes_written, s.bytes_read, s.errors) == (1, 4096, 0, 0)
    assert rig.calls() == 1


def test_write(rig: Rig) -> None:
    data = bytes(range(256)) * 4
    req = rig.write_req(5, data)
    assert rig.process() == 1
    assert_ok(rig, req, 1)
    expect = rig.initial[:5 * SECTOR] + data + rig.initial[5 * SECTOR + len(data):]
    assert rig.file() == expect
    s = rig.vring.stats()
    assert (s.requests, s.bytes_read, s.bytes_written) == (1, 1024, 0)


def test_write_then_read_back(rig: Rig) -> None:
    w = rig.write_req(255, b"Z" * SECTOR)           # the last sector
    r = rig.read_req(254, 2 * SECTOR)
    assert rig.process() == 2
    assert rig.ring.take_used() == [(w.head, 1), (r.head, 2 * SECTOR + 1)]
    assert rig.status_of(w) == rig.status_of(r) == VIRTIO_BLK_S_OK
    assert rig.data_of(r) == rig.initial[254 * SECTOR: 255 * SECTOR] + b"Z" * SECTOR


def test_flush(rig: Rig) -> None:
    req = rig.request(VIRTIO_BLK_T_FLUSH, 0)
    assert rig.process() == 1
    assert_ok(rig, req, 1)
    assert rig.file() == rig.initial


def test_get_id(rig: Rig) -> None:
    req = rig.request(VIRTIO_BLK_T_GET_ID, 0, read_len=20)
    assert rig.process() == 1
    assert_ok(rig, req, 21)
    assert rig.data_of(req) == b"SER123" + bytes(14)


def test_get_id_20_byte_serial_and_larger_buffer(rig_factory: RigFactory) -> None:
    rig = rig_factory(serial=b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")   # truncated to 20 bytes
    req = rig.request(VIRTIO_BLK_T_GET_ID, 0, read_len=64)
    assert rig.process() == 1
    assert_ok(rig, req, 21)
    assert rig.data_of(req) == b"ABCDEFGHIJKLMNOPQRST" + bytes(44)


def test_get_id_short_buffer(rig: Rig) -> None:
    req = rig.request(VIRTIO_BLK_T_GET_ID, 0, read_len=4)
    assert rig.process() == 1
    assert_ok(rig, req, 5)
    assert rig.data_of(req) == b"SER1"


def test_header_split_across_two_descriptors(rig: Rig) -> None:
    req = rig.read_req(7, SECTOR, split_header=True)
    assert rig.ring.chains[req.head].__len__() == 4
    assert rig.process() == 1
    assert_ok(rig, req, SECTOR + 1)
    assert rig.data_of(req) == rig.initial[7 * SECTOR: 8 * SECTOR]


def test_header_split_in_odd_pieces_and_write(rig: Rig) -> None:
    h = rig.header(VIRTIO_BLK_T_OUT, 9)
    data = rig.alloc(b"Q" * SECTOR)
    st = rig.status()
    head = rig.ring.submit([Buf(h, 1), Buf(h + 1, 6), Buf(h + 7, 9), Buf(data, SECTOR), Buf(st, 1, True)])
    assert rig.process() == 1
    assert rig.ring.take_used() == [(head, 1)]
    assert rig.ram.read(st, 1) == bytes([VIRTIO_BLK_S_OK])
    assert rig.file()[9 * SECTOR: 10 * SECTOR] == b"Q" * SECTOR


def test_header_and_data_in_one_descriptor(rig: Rig) -> None:
    """A T_OUT whose first readable buffer holds the header and the data."""
    buf = rig.alloc(struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 2) + b"D" * SECTOR)
    st = rig.status()
    head = rig.ring.submit([Buf(buf, 16 + SECTOR), Buf(st, 1, True)])
    assert rig.process() == 1
    assert rig.ring.take_used() == [(head, 1)]
    assert rig.file()[2 * SECTOR: 3 * SECTOR] == b"D" * SECTOR


def test_data_split_across_two_memory_regions(rig: Rig) -> None:
    boundary = rig.ram.regions[1].gpa
    gpa = boundary - 1024
    assert rig.mem.gpa_to_hva(gpa, 4096) is None and len(rig.mem.gpa_to_iov(gpa, 4096)) == 2
    h, st = head_request(rig, VIRTIO_BLK_T_IN, 16)
    head = rig.ring.submit([Buf(h, 16), Buf(gpa, 4096, True), Buf(st, 1, True)])
    assert rig.process() == 1
    assert rig.ring.take_used() == [(head, 4097)]
    assert rig.ram.read(gpa, 4096) == rig.initial[16 * SECTOR: 16 * SECTOR + 4096]
    # And back out: write the same straddling buffer to other sectors.
    rig.ram.write(gpa, b"x" * 1024 + b"y" * 3072)
    h2, st2 = head_request(rig, VIRTIO_BLK_T_OUT, 40)
    head2 = rig.ring.submit([Buf(h2, 16), Buf(gpa, 4096), Buf(st2, 1, True)])
    assert rig.process() == 1
    assert rig.ring.take_used() == [(head2, 1)]
    assert rig.file()[40 * SECTOR: 40 * SECTOR + 4096] == b"x" * 1024 + b"y" * 3072


def test_status_byte_at_the_end_of_a_buffer_straddling_regions(rig: Rig) -> None:
    boundary = rig.ram.regions[1].gpa
    gpa = boundary - 100
    h = rig.header(VIRTIO_BLK_T_IN, 1)
    rig.ram.write(gpa, b"\xee" * (SECTOR + 1))
    head = rig.ring.submit([Buf(h, 16), Buf(gpa, SECTOR + 1, True)])   # data + status in one buffer
    assert rig.process() == 1
    assert rig.ring.take_used() == [(head, SECTOR + 1)]
    assert rig.ram.read(gpa, SECTOR) == rig.initial[SECTOR: 2 * SECTOR]
    assert rig.ram.read(gpa + SECTOR, 1) == bytes([VIRTIO_BLK_S_OK])


def test_indirect_read_and_write(rig: Rig) -> None:
    w = rig.write_req(20, b"I" * 2048, indirect=True)
    r = rig.read_req(20, 2048, indirect=True, split_header=True)
    assert rig.process() == 2
    assert rig.ring.take_used() == [(w.head, 1), (r.head, 2049)]
    assert rig.data_of(r) == b"I" * 2048
    assert rig.ring.chains == {}


def test_indirect_after_a_direct_descriptor(rig: Rig) -> None:
    """Direct header -> indirect table (data + status): allowed, the indirect
    descriptor is the last of the chain."""
    h = rig.header(VIRTIO_BLK_T_IN, 4)
    data = rig.alloc(SECTOR, 512)
    st = rig.status()
    table = rig.alloc(struct.pack("<QIHH", data, SECTOR, W | N, 1) + struct.pack("<QIHH", st, 1, W, 0))
    rig.ring.write_desc(0, h, 16, N, 1)
    rig.ring.write_desc(1, table, 32, I, 0)
    rig.ring.push_avail(0)
    assert rig.process() == 1
    assert rig.ring.take_used() == [(0, SECTOR + 1)]
    assert rig.ram.read(data, SECTOR) == rig.initial[4 * SECTOR: 5 * SECTOR]


# --- malformed rings: the ring breaks ------------------------------------------------

def indirect_table(rig: Rig, entries: list[tuple[int, int, int, int]]) -> int:
    return rig.alloc(b"".join(struct.pack("<QIHH", *e) for e in entries))


def test_indirect_when_not_negotiated(rig_factory: RigFactory) -> None:
    rig = rig_factory(indirect=False)
    rig.read_req(0, SECTOR, indirect=True)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_INDIRECT)


def test_indirect_inside_an_indirect_table(rig: Rig) -> None:
    h, st = head_request(rig)
    inner = indirect_table(rig, [(h, 16, N, 1), (st, 1, W, 0)])
    outer = indirect_table(rig, [(inner, 32, I, 0)])
    rig.ring.write_desc(0, outer, 16, I)
    rig.ring.push_avail(0)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_INDIRECT)


def test_indirect_with_next_flag(rig: Rig) -> None:
    h, st = head_request(rig)
    table = indirect_table(rig, [(h, 16, N, 1), (st, 1, W, 0)])
    rig.ring.write_desc(0, table, 32, I | N, 1)
    rig.ring.write_desc(1, st, 1, W)
    rig.ring.push_avail(0)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_INDIRECT)


@pytest.mark.parametrize("length", [0, 8, 24, 33])
def test_indirect_table_length_not_a_multiple_of_16(rig: Rig, length: int) -> None:
    h, st = head_request(rig)
    table = indirect_table(rig, [(h, 16, N, 1), (st, 1, W, 0), (0, 0, 0, 0)])
    rig.ring.write_desc(0, table, length, I)
    rig.ring.push_avail(0)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_INDIRECT)


@pytest.mark.parametrize("where", ["below", "past_end", "straddles_end", "straddles_regions"])
def test_indirect_table_outside_memory(rig: Rig, where: str) -> None:
    addr = {"below": 0x1000, "past_end": rig.ram.end, "straddles_end": rig.ram.end - 16,
            "straddles_regions": rig.ram.regions[1].gpa - 16}[where]
    rig.ring.write_desc(0, addr, 32, I)
    rig.ring.push_avail(0)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_ADDR)


def test_descriptor_loop(rig: Rig) -> None:
    h, st = head_request(rig)
    rig.ring.write_desc(0, h, 8, N, 1)
    rig.ring.write_desc(1, h + 8, 8, N, 0)     # a -> b -> a
    rig.ring.push_avail(0)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_CHAIN_LEN)


def test_descriptor_self_loop_of_empty_buffers(rig: Rig) -> None:
    rig.ring.write_desc(3, 0, 0, N, 3)           # zero-length, points to itself
    rig.ring.push_avail(3)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_CHAIN_LEN)


def test_loop_inside_an_indirect_table(rig: Rig) -> None:
    h, st = head_request(rig)
    table = indirect_table(rig, [(h, 16, N, 1), (h, 16, N, 2), (h, 16, N, 1)])
    rig.ring.write_desc(0, table, 48, I)
    rig.ring.push_avail(0)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_CHAIN_LEN)


def test_chain_of_exactly_ring_size_is_accepted(rig_factory: RigFactory) -> None:
    rig = rig_factory(num=4)
    h, st = head_request(rig, VIRTIO_BLK_T_IN, 6)
    d1, d2 = rig.alloc(SECTOR, 512), rig.alloc(SECTOR, 512)
    head = rig.ring.submit([Buf(h, 16), Buf(d1, SECTOR, True), Buf(d2, SECTOR, True), Buf(st, 1, True)])
    assert rig.process() == 1
    assert rig.ring.take_used() == [(head, 2 * SECTOR + 1)]
    assert rig.ram.read(d1, SECTOR) + rig.ram.read(d2, SECTOR) == rig.initial[6 * SECTOR: 8 * SECTOR]


def test_chain_longer_than_ring_size(rig_factory: RigFactory) -> None:
    """Four descriptors of a size-4 ring, the last pointing back to the first:
    the walk stops after 4 and breaks the ring instead of going on."""
    rig = rig_factory(num=4)
    h = rig.header(VIRTIO_BLK_T_IN, 0)
    for i in range(4):
        rig.ring.write_desc(i, h, 16, N, (i + 1) % 4)
    rig.ring.push_avail(0)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_CHAIN_LEN)


def test_indirect_chain_longer_than_its_table(rig: Rig) -> None:
    h, st = head_request(rig)
    table = indirect_table(rig, [(h, 16, N, 1), (st, 1, W | N, 1)])   # 1 -> 1
    rig.ring.write_desc(0, table, 32, I)
    rig.ring.push_avail(0)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_CHAIN_LEN)


def test_next_out_of_range(rig: Rig) -> None:
    h, st = head_request(rig)
    rig.ring.write_desc(0, h, 16, N, rig.num)    # == num: one past the table
    rig.ring.push_avail(0)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_NEXT)


def test_next_out_of_range_in_indirect_table(rig: Rig) -> None:
    h, st = head_request(rig)
    table = indirect_table(rig, [(h, 16, N, 2), (st, 1, W, 0)])   # 2 entries: next=2 is out
    rig.ring.write_desc(0, table, 32, I)
    rig.ring.push_avail(0)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_NEXT)


@pytest.mark.parametrize("head", [16, 17, 0xFFFF])
def test_head_out_of_range(rig: Rig, head: int) -> None:
    rig.ring.push_avail(head)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_HEAD)


def test_avail_idx_jumps_by_more_than_ring_size(rig: Rig) -> None:
    rig.ring.set_avail_idx(rig.num + 1)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_AVAIL_IDX)


def test_avail_idx_jumping_backwards_is_a_huge_jump(rig: Rig) -> None:
    rig.ring.set_avail_idx(0xFFFF)    # last_avail_idx is 0: 65535 pending
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_AVAIL_IDX)


def test_avail_idx_jump_of_exactly_ring_size_is_accepted(rig: Rig) -> None:
    reqs = [rig.request(VIRTIO_BLK_T_FLUSH, 0, indirect=True) for _ in range(rig.num)]
    assert rig.ring.avail_idx == rig.num
    assert rig.process() == rig.num
    assert [h for h, _ in rig.ring.take_used()] == [r.head for r in reqs]
    assert rig.broken == 0


@pytest.mark.parametrize("which", ["header", "data", "status"])
@pytest.mark.parametrize("addr", ["zero", "below_base", "past_end", "far", "top"])
def test_buffer_outside_memory(rig: Rig, which: str, addr: str) -> None:
    bad = {"zero": 0, "below_base": rig.ram.regions[0].gpa - 512, "past_end": rig.ram.end,
           "far": 0x1_0000_0000, "top": 2**64 - 512}[addr]
    h, st = head_request(rig, VIRTIO_BLK_T_IN, 0)
    data = rig.alloc(SECTOR, 512)
    bufs = {"header": Buf(h, 16), "data": Buf(data, SECTOR, True), "status": Buf(st, 1, True)}
    setattr(bufs[which], "gpa", bad)
    rig.ring.submit(list(bufs.values()))
    before = snapshot_outside_used(rig)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_ADDR)
    assert snapshot_outside_used(rig) == before
    assert rig.file() == rig.initial


@pytest.mark.parametrize("length", [SECTOR + 1, 2**32 - 1])
def test_buffer_straddling_the_end_of_memory(rig: Rig, length: int) -> None:
    h, st = head_request(rig)
    gpa = rig.ram.end - SECTOR
    rig.ring.submit([Buf(h, 16), Buf(gpa, length, True), Buf(st, 1, True)])
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_ADDR)
    assert rig.ram.read(gpa, SECTOR) == bytes(SECTOR)


def test_readable_after_writable(rig: Rig) -> None:
    h, st = head_request(rig, VIRTIO_BLK_T_OUT, 0)
    data = rig.alloc(b"R" * SECTOR, 512)
    rig.ring.submit([Buf(h, 16), Buf(st, 1, True), Buf(data, SECTOR)])
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_ORDER)
    assert rig.file() == rig.initial


def test_readable_after_a_zero_length_writable_is_accepted(rig: Rig) -> None:
    """An empty device-writable buffer adds no segment, so ordering holds."""
    h, st = head_request(rig, VIRTIO_BLK_T_FLUSH)
    head = rig.ring.submit([Buf(h, 8), Buf(h, 0, True), Buf(h + 8, 8), Buf(st, 1, True)])
    assert rig.process() == 1
    assert rig.ring.take_used() == [(head, 1)]
    assert rig.ram.read(st, 1) == bytes([VIRTIO_BLK_S_OK])


def test_segment_limit(rig: Rig) -> None:
    """VHD_MAX_IOV (1024) segments are fine; 1025 break the ring."""
    h = rig.header(VIRTIO_BLK_T_IN, 0)
    st = rig.status()
    ok = [(h + i, 1, N, i + 1) for i in range(16)] + [(h, 1, N, i + 1) for i in range(16, 1023)]
    ok.append((st, 1, W, 0))
    assert len(ok) == lib.VHD_MAX_IOV == 1024
    rig.ring.write_desc(0, indirect_table(rig, ok), 16 * len(ok), I)
    rig.ring.push_avail(0)
    assert rig.process() == 1
    assert rig.ring.take_used() == [(0, 1)]
    assert rig.ram.read(st, 1) == bytes([VIRTIO_BLK_S_OK])
    too_many = ok[:-1] + [(h, 1, N, 1024), (st, 1, W, 0)]
    rig.ring.write_desc(1, indirect_table(rig, too_many), 16 * len(too_many), I)
    rig.ring.push_avail(1)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_IOV, handled=1)


def test_chain_length_over_4_gib(rig_factory: RigFactory) -> None:
    """Two 2 GiB writable buffers (the same sparse memory twice)."""
    rig = rig_factory(region_sizes=(1 << 16, 1 << 31))
    big = rig.ram.regions[1].gpa
    h, st = head_request(rig)
    rig.ring.submit([Buf(h, 16), Buf(big, 1 << 31, True), Buf(big, 1 << 31, True), Buf(st, 1, True)])
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_LEN)


# --- virtio-blk errors: the request fails, the ring does not break ------------------------

def test_sector_past_the_end(rig: Rig) -> None:
    r1 = rig.read_req(256, SECTOR)           # first sector past the end
    r2 = rig.read_req(255, 2 * SECTOR)       # starts inside, ends past
    w1 = rig.write_req(256, b"w" * SECTOR)
    w2 = rig.write_req(255, b"w" * 2 * SECTOR)
    assert rig.process() == 4
    assert rig.ring.take_used() == [(r1.head, 1), (r2.head, 1), (w1.head, 1), (w2.head, 1)]
    assert [rig.status_of(r) for r in (r1, r2, w1, w2)] == [VIRTIO_BLK_S_IOERR] * 4
    assert rig.data_of(r1) == bytes(SECTOR) and rig.data_of(r2) == bytes(2 * SECTOR)
    assert rig.file() == rig.initial
    assert rig.vring.stats().errors == 4 and rig.broken == 0 and rig.errors() == 0


@pytest.mark.parametrize("sector", [2**55, 2**55 + 1, 2**63, 2**64 - 1, 2**64 - 8])
def test_sector_whose_byte_offset_overflows(rig: Rig, sector: int) -> None:
    r = rig.read_req(sector, SECTOR)
    w = rig.write_req(sector, b"o" * SECTOR)
    assert rig.process() == 2
    assert rig.ring.take_used() == [(r.head, 1), (w.head, 1)]
    assert rig.status_of(r) == rig.status_of(w) == VIRTIO_BLK_S_IOERR
    assert rig.data_of(r) == bytes(SECTOR)
    assert rig.file() == rig.initial


@pytest.mark.parametrize("length", [1, 100, 511, 513, 1000])
def test_data_length_not_a_multiple_of_512(rig: Rig, length: int) -> None:
    r = rig.read_req(0, length)
    w = rig.write_req(0, b"n" * length)
    assert rig.process() == 2
    assert rig.ring.take_used() == [(r.head, 1), (w.head, 1)]
    assert rig.status_of(r) == rig.status_of(w) == VIRTIO_BLK_S_IOERR
    assert rig.data_of(r) == bytes(length)
    assert rig.file() == rig.initial


def test_zero_length_read_and_write_succeed(rig: Rig) -> None:
    r = rig.request(VIRTIO_BLK_T_IN, 256)      # at the capacity: zero bytes is in range
    w = rig.request(VIRTIO_BLK_T_OUT, 3)
    assert rig.process() == 2
    assert rig.ring.take_used() == [(r.head, 1), (w.head, 1)]
    assert rig.status_of(r) == rig.status_of(w) == VIRTIO_BLK_S_OK
    assert rig.file() == rig.initial


def test_write_to_read_only_device(rig_factory: RigFactory) -> None:
    rig = rig_factory(readonly=True)
    w = rig.write_req(0, b"r" * SECTOR)
    r = rig.read_req(0, SECTOR)
    f = rig.request(VIRTIO_BLK_T_FLUSH, 0)
    assert rig.process() == 3
    assert rig.ring.take_used() == [(w.head, 1), (r.head, SECTOR + 1), (f.head, 1)]
    assert rig.status_of(w) == VIRTIO_BLK_S_IOERR
    assert rig.status_of(r) == VIRTIO_BLK_S_OK and rig.data_of(r) == rig.initial[:SECTOR]
    assert rig.status_of(f) == VIRTIO_BLK_S_OK
    assert rig.file() == rig.initial


@pytest.mark.parametrize("type_", [2, 3, 5, 11, 13, 0x8000_0000, 0xFFFF_FFFF])
def test_unknown_request_type(rig: Rig, type_: int) -> None:
    req = rig.request(type_, 0, read_len=SECTOR)
    assert rig.process() == 1
    assert_ok(rig, req, 1, VIRTIO_BLK_S_UNSUPP)
    assert rig.data_of(req) == bytes(SECTOR)
    assert rig.file() == rig.initial


@pytest.mark.parametrize("hdr_len", [0, 1, 8, 15])
def test_header_shorter_than_16_bytes(rig: Rig, hdr_len: int) -> None:
    h = rig.header(VIRTIO_BLK_T_OUT, 0)
    data = rig.alloc(b"s" * SECTOR, 512)
    st = rig.status()
    # Readable header then writable data+status: the short header cannot be
    # completed from the device-writable part.
    bufs = ([Buf(h, hdr_len)] if hdr_len else []) + [Buf(data, SECTOR, True), Buf(st, 1, True)]
    head = rig.ring.submit(bufs)
    assert rig.process() == 1
    assert rig.ring.take_used() == [(head, 1)]
    assert rig.ram.read(st, 1) == bytes([VIRTIO_BLK_S_IOERR])
    assert rig.ram.read(data, SECTOR) == b"s" * SECTOR
    assert rig.file() == rig.initial


@pytest.mark.parametrize("type_", [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_GET_ID, 99])
def test_no_writable_status_buffer(rig: Rig, type_: int) -> None:
    h = rig.header(type_, 1)
    data = rig.alloc(b"d" * SECTOR, 512)
    head = rig.ring.submit([Buf(h, 16), Buf(data, SECTOR)])
    before = snapshot_outside_used(rig)
    assert rig.process() == 1
    assert rig.ring.take_used() == [(head, 0)]
    assert snapshot_outside_used(rig) == before     # nothing written anywhere
    assert rig.file() == rig.initial
    assert rig.vring.stats().errors == 1 and rig.broken == 0


def test_only_zero_length_writable_buffers_count_as_no_status(rig: Rig) -> None:
    h, st = head_request(rig, VIRTIO_BLK_T_IN, 0)
    head = rig.ring.submit([Buf(h, 16), Buf(st, 0, True)])
    before = snapshot_outside_used(rig)
    assert rig.process() == 1
    assert rig.ring.take_used() == [(head, 0)]
    assert snapshot_outside_used(rig) == before


# --- broken stays broken ----------------------------------------------------------------

def test_broken_ring_stays_broken(rig: Rig) -> None:
    good = rig.read_req(0, SECTOR)
    rig.ring.push_avail(99)                    # bad head
    assert rig.process() == 1
    assert rig.ring.take_used() == [(good.head, SECTOR + 1)]
    assert_broken(rig, lib.VHD_ERR_HEAD, handled=1)
    # Repair the entry and add a valid request: nothing more is served.
    rig.ring.ram.write(rig.ring.avail + 4 + 2, struct.pack("<H", 1))
    later = rig.read_req(1, SECTOR)
    for _ in range(3):
        assert rig.process() == 0
        assert rig.pop() == lib.VHD_ERR_HEAD
    assert rig.ring.used_idx() == 1 and rig.vring.used_idx == 1
    assert rig.vring.last_avail_idx == 1
    assert rig.status_of(later) == 0xFF
    assert rig.errors() == 0                   # err eventfd signalled once only
    assert rig.vring.stats().requests == 1


def test_setup_again_clears_broken(rig: Rig) -> None:
    rig.ring.push_avail(99)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_HEAD)
    rig.ram.write(rig.ring.avail + 4, struct.pack("<H", 0))
    rig.ring.avail_idx = 0
    req = rig.read_req(2, SECTOR)
    rig.ring.set_avail_idx(1)
    rig.setup(last_avail_idx=0)
    assert rig.broken == 0
    assert rig.process() == 1
    assert rig.ring.take_used() == [(req.head, SECTOR + 1)]
    assert rig.vring.stats().requests == 1     # counters survive a re-setup


def test_pop_on_empty_ring(rig: Rig) -> None:
    assert rig.pop() == lib.VHD_POP_EMPTY
    assert rig.process() == 0
    assert rig.broken == 0 and rig.calls() == 0 and rig.ring.used_idx() == 0


# --- notifications ---------------------------------------------------------------------------

def flushes(rig: Rig, n: int) -> list[object]:
    return [rig.request(VIRTIO_BLK_T_FLUSH, 0) for _ in range(n)]


def test_event_idx_avail_event_tracks_last_avail_idx(rig_factory: RigFactory) -> None:
    rig = rig_factory(event_idx=True)
    flushes(rig, 3)
    assert rig.process() == 3
    assert rig.vring.last_avail_idx == 3
    assert rig.ring.avail_event() == 3
    flushes(rig, 2)
    assert rig.process() == 2
    assert rig.ring.avail_event() == 5
    assert rig.ring.used_flags() == 0     # EVENT_IDX: the flag is not used


def test_event_idx_call_only_when_used_event_says_so(rig_factory: RigFactory) -> None:
    rig = rig_factory(event_idx=True)
    rig.ring.set_used_event(1000)
    flushes(rig, 1)
    assert rig.process() == 1
    assert rig.calls() == 1          # the first flush after setup always notifies (as Linux vhost)
    # used idx is 1 now.  Far ahead: no call.
    rig.ring.set_used_event(1000)
    flushes(rig, 1)
    assert rig.process() == 1 and rig.ring.used_idx() == 2
    assert rig.calls() == 0
    # One ahead of the next completion (wants a call when used goes past 3): none yet.
    rig.ring.set_used_event(3)
    flushes(rig, 1)
    assert rig.process() == 1 and rig.ring.used_idx() == 3
    assert rig.calls() == 0
    flushes(rig, 1)
    assert rig.process() == 1 and rig.ring.used_idx() == 4
    assert rig.calls() == 1
    # Exactly at the index the next completion moves past: a call.
    rig.ring.set_used_event(4)
    flushes(rig, 1)
    assert rig.process() == 1
    assert rig.calls() == 1
    # Behind (already passed): no call.
    rig.ring.set_used_event(2)
    flushes(rig, 1)
    assert rig.process() == 1
    assert rig.calls() == 0
    assert rig.vring.stats().calls == 3


def test_event_idx_one_call_per_batch(rig_factory: RigFactory) -> None:
    rig = rig_factory(event_idx=True)
    flushes(rig, 1)
    rig.process()
    assert rig.calls() == 1
    rig.ring.set_used_event(2)        # inside the next batch (used 1 -> 4)
    flushes(rig, 3)
    assert rig.process() == 3
    assert rig.calls() == 1
    assert rig.vring.stats().batches == 2


def test_no_interrupt_flag_without_event_idx(rig: Rig) -> None:
    rig.ring.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    flushes(rig, 2)
    assert rig.process() == 2
    assert rig.calls() == 0
    rig.ring.set_avail_flags(0)
    flushes(rig, 1)
    assert rig.process() == 1
    assert rig.calls() == 1
    assert rig.ring.used_flags() == 0     # kicks re-enabled after processing
    assert rig.vring.stats().calls == 1


def test_no_call_fd_means_no_notification(rig: Rig) -> None:
    ram, ring = rig.ram, rig.ring
    rig.vring.setup(rig.mem, num=rig.num, desc=ram.gpa_to_uva(ring.desc),
                    avail=ram.gpa_to_uva(ring.avail), used=ram.gpa_to_uva(ring.used),
                    last_avail_idx=0, event_idx=False, indirect=True, call_fd=-1, err_fd=-1)
    flushes(rig, 1)
    assert rig.process() == 1
    assert rig.calls() == 0 and rig.vring.stats().calls == 0
    rig.ring.push_avail(99)
    assert rig.process() == 0
    assert rig.broken == lib.VHD_ERR_HEAD and rig.errors() == 0


# --- batching and index wrap-around -------------------------------------------------------

def test_more_than_one_batch(rig_factory: RigFactory) -> None:
    rig = rig_factory(num=128, region_sizes=(1 << 18, 1 << 18))
    reqs = [rig.read_req(i, SECTOR, indirect=True) for i in range(100)]
    assert rig.process() == 100
    used = rig.ring.take_used()
    assert used == [(r.head, SECTOR + 1) for r in reqs]
    assert all(rig.data_of(r) == rig.initial[i * SECTOR: (i + 1) * SECTOR] for i, r in enumerate(reqs))
    s = rig.vring.stats()
    assert s.batches == 2 and s.requests == 100   # 64 + 36


def test_index_wrap_around(rig_factory: RigFactory) -> None:
    start = 0xFFFA
    rig = rig_factory(last_avail_idx=start)
    rig.ring.avail_idx = start
    rig.ram.write(rig.ring.used + 2, struct.pack("<H", start))    # used idx continues from there
    rig.ring.last_used = start
    rig.setup(last_avail_idx=start)
    reqs = [rig.read_req(i, SECTOR, indirect=True) for i in range(10)]
    assert rig.process() == 10
    assert rig.vring.last_avail_idx == (start + 10) & 0xFFFF == 4
    assert rig.ring.used_idx() == 4
    assert rig.ring.take_used() == [(r.head, SECTOR + 1) for r in reqs]


# --- setup validation ------------------------------------------------------------------------

@pytest.mark.parametrize("num", [0, 3, 100, 65536, 2**32 - 1])
def test_setup_rejects_bad_ring_size(rig: Rig, num: int) -> None:
    v = NativeVring()
    try:
        with pytest.raises(NativeError) as ei:
            v.setup(rig.mem, num=num, desc=rig.ram.gpa_to_uva(rig.ring.desc),
                    avail=rig.ram.gpa_to_uva(rig.ring.avail), used=rig.ram.gpa_to_uva(rig.ring.used),
                    last_avail_idx=0, event_idx=False, indirect=False, call_fd=-1, err_fd=-1)
        assert ei.value.errno == errno.EINVAL
    finally:
        v.close()


@pytest.mark.parametrize("field,delta,err", [
    ("desc", 8, errno.EINVAL), ("avail", 1, errno.EINVAL), ("used", 2, errno.EINVAL),
    ("desc", -(1 << 30), errno.EFAULT), ("used", 1 << 40, errno.EFAULT),
])
def test_setup_rejects_misaligned_or_unmapped_rings(rig: Rig, field: str, delta: int, err: int) -> None:
    addrs = {k: rig.ram.gpa_to_uva(getattr(rig.ring, k)) for k in ("desc", "avail", "used")}
    addrs[field] += delta
    v = NativeVring()
    try:
        with pytest.raises(NativeError) as ei:
            v.setup(rig.mem, num=rig.num, desc=addrs["desc"], avail=addrs["avail"], used=addrs["used"],
                    last_avail_idx=0, event_idx=True, indirect=False, call_fd=-1, err_fd=-1)
        assert ei.value.errno == err
    finally:
        v.close()


def test_setup_rejects_a_used_ring_running_off_the_end(rig: Rig) -> None:
    end_uva = rig.ram.regions[-1].uva + rig.ram.regions[-1].size
    v = NativeVring()
    try:
        with pytest.raises(NativeError) as ei:
            v.setup(rig.mem, num=rig.num, desc=rig.ram.gpa_to_uva(rig.ring.desc),
                    avail=rig.ram.gpa_to_uva(rig.ring.avail), used=end_uva - (4 + 8 * rig.num),
                    last_avail_idx=0, event_idx=True, indirect=False, call_fd=-1, err_fd=-1)
        assert ei.value.errno == errno.EFAULT     # avail_event (2 more bytes) is not mapped
    finally:
        v.close()


@pytest.mark.parametrize("engine", ["sync", "io_uring"])
@pytest.mark.parametrize("length, batches", [(4096, 1), (128 * 1024, 3)], ids=["4 KiB: one", "128 KiB: each"])
def test_large_requests_are_published_as_they_complete(rig_factory: RigFactory, length: int,
                                                       batches: int, engine: str) -> None:
    """A batch of small requests is published once; large ones (>= 128 KiB of
    data) each as soon as done, so the driver can reuse them while the rest
    of the batch is still being copied (the image is in the page cache: the
    io_uring engine completes these inline too)."""
    rig = rig_factory(region_sizes=(1 << 20, 1 << 20), sectors=2048)
    reqs = [rig.read_req(i * (length // SECTOR), length, indirect=True) for i in range(3)]
    if engine == "sync":
        rig.process()
    else:
        rig.process_uring()
    assert rig.ring.take_used() == [(req.head, length + 1) for req in reqs]
    for i, req in enumerate(reqs):
        assert rig.status_of(req) == VIRTIO_BLK_S_OK
        assert rig.data_of(req) == rig.initial[i * length:(i + 1) * length]
    assert rig.vring.stats().batches == batches
