"""The C packed virtqueue (virtio 1.2 2.8) and virtio-blk on it, driven
synchronously on rings built by the Python front-end's PackedDriverRing.

The layout-independent cases of test_vring.py (well-formed requests, blk
errors, buffers outside memory, wrong direction, batching) run here again on
packed rings: they are imported, and this module's ``rig`` fixtures build
packed rigs.  Below them the cases only a packed ring has: wrap counters,
buffer ids, out-of-order completion, batched publication, event suppression,
and the packed forms of the hostile chains."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from test_vring import (  # noqa: F401  (collected again here, on packed rings)
    assert_broken,
    assert_ok,
    head_request,
    test_avail_idx_jump_of_exactly_ring_size_is_accepted,
    test_buffer_outside_memory,
    test_buffer_straddling_the_end_of_memory,
    test_chain_length_over_4_gib,
    test_chain_of_exactly_ring_size_is_accepted,
    test_data_length_not_a_multiple_of_512,
    test_data_split_across_two_memory_regions,
    test_flush,
    test_get_id,
    test_get_id_20_byte_serial_and_larger_buffer,
    test_get_id_short_buffer,
    test_header_and_data_in_one_descriptor,
    test_header_shorter_than_16_bytes,
    test_header_split_across_two_descriptors,
    test_header_split_in_odd_pieces_and_write,
    test_indirect_read_and_write,
    test_indirect_when_not_negotiated,
    test_large_requests_are_published_as_they_complete,
    test_more_than_one_batch,
    test_no_writable_status_buffer,
    test_only_zero_length_writable_buffers_count_as_no_status,
    test_pop_on_empty_ring,
    test_read,
    test_readable_after_a_zero_length_writable_is_accepted,
    test_readable_after_writable,
    test_sector_past_the_end,
    test_sector_whose_byte_offset_overflows,
    test_status_byte_at_the_end_of_a_buffer_straddling_regions,
    test_unknown_request_type,
    test_write,
    test_write_then_read_back,
    test_write_to_read_only_device,
    test_zero_length_read_and_write_succeed,
)
from vhd_helpers import SECTOR, Rig
from vhostd._native import ffi, lib
from vhostd.frontend import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    Buf,
    PackedDriverRing,
)
from vhostd.native import NativeError, NativeVring

pytestmark = pytest.mark.usefixtures("watchdog")

N, W, I = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
A, U = VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED
RigFactory = Callable[..., Rig]


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[RigFactory]:
    rigs: list[Rig] = []

    def make(**kw: object) -> Rig:
        d = tmp_path / f"rig{len(rigs)}"
        d.mkdir()
        rig = Rig(d, packed=True, **kw)  # type: ignore[arg-type]
        rigs.append(rig)
        return rig

    yield make
    for r in rigs:
        r.close()


@pytest.fixture
def rig(rig_factory: RigFactory) -> Rig:
    return rig_factory()


def pring(rig: Rig) -> PackedDriverRing:
    assert isinstance(rig.ring, PackedDriverRing)
    return rig.ring


def table(rig: Rig, entries: list[tuple[int, int, int]]) -> int:
    """An indirect table of (addr, len, flags) entries."""
    return rig.alloc(b"".join(struct.pack("<QIHH", a, n, 0, f) for a, n, f in entries))


def raw(rig: Rig, descs: list[tuple[int, int, int, int]]) -> None:
    """Descriptors (addr, len, flags, id) made available as one chain."""
    pring(rig).add_raw(descs)
    pring(rig).push_raw()


def position(rig: Rig) -> tuple[int, bool, int, bool]:
    """(last_avail position, avail wrap, used position, used wrap) of the device."""
    a, u = rig.vring.last_avail_idx, rig.vring.used_idx
    return a & 0x7FFF, bool(a >> 15), u & 0x7FFF, bool(u >> 15)


# --- the packed forms of the hostile chains --------------------------------------------

def test_indirect_inside_an_indirect_table(rig: Rig) -> None:
    h, st = head_request(rig)
    inner = table(rig, [(h, 16, 0), (st, 1, W)])
    outer = table(rig, [(inner, 32, I)])
    raw(rig, [(outer, 16, I, 0)])
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_INDIRECT)


def test_indirect_with_next_flag(rig: Rig) -> None:
    h, st = head_request(rig)
    t = table(rig, [(h, 16, 0), (st, 1, W)])
    raw(rig, [(t, 32, I | N, 0), (st, 1, W, 0)])
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_INDIRECT)


@pytest.mark.parametrize("length", [0, 8, 24, 33])
def test_indirect_table_length_not_a_multiple_of_16(rig: Rig, length: int) -> None:
    h, st = head_request(rig)
    t = table(rig, [(h, 16, 0), (st, 1, W), (0, 0, 0)])
    raw(rig, [(t, length, I, 0)])
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_INDIRECT)


@pytest.mark.parametrize("where", ["below", "past_end", "straddles_end", "straddles_regions"])
def test_indirect_table_outside_memory(rig: Rig, where: str) -> None:
    addr = {"below": 0x1000, "past_end": rig.ram.end, "straddles_end": rig.ram.end - 16,
            "straddles_regions": rig.ram.regions[1].gpa - 16}[where]
    raw(rig, [(addr, 32, I, 0)])
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_ADDR)


def test_indirect_table_ignores_next_and_ids(rig: Rig) -> None:
    """Entries follow each other: NEXT and ids in a packed indirect table are
    reserved and ignored (virtio 1.2 2.8.19); the table length counts."""
    h, st = head_request(rig, VIRTIO_BLK_T_IN, 3)
    data = rig.alloc(SECTOR, 512)
    t = rig.alloc(struct.pack("<QIHH", h, 16, 7, N) + struct.pack("<QIHH", data, SECTOR, 9, W | N)
                  + struct.pack("<QIHH", st, 1, 3, W | N))
    raw(rig, [(t, 48, I, 5)])
    assert rig.process() == 1
    assert rig.ring.take_used() == [(5, SECTOR + 1)]
    assert rig.ram.read(data, SECTOR) == rig.initial[3 * SECTOR: 4 * SECTOR]


def test_indirect_after_a_direct_descriptor(rig: Rig) -> None:
    h = rig.header(VIRTIO_BLK_T_IN, 4)
    data = rig.alloc(SECTOR, 512)
    st = rig.status()
    t = table(rig, [(data, SECTOR, W), (st, 1, W)])
    raw(rig, [(h, 16, N, 2), (t, 32, I, 2)])
    assert rig.process() == 1
    assert rig.ring.take_used() == [(2, SECTOR + 1)]
    assert rig.ram.read(data, SECTOR) == rig.initial[4 * SECTOR: 5 * SECTOR]
    assert position(rig) == (2, True, 2, True)


def test_chain_longer_than_the_ring(rig_factory: RigFactory) -> None:
    """Every descriptor of a size-4 ring has NEXT: the walk reads each slot
    once, then stops and breaks the ring instead of going round."""
    rig = rig_factory(num=4)
    h = rig.header(VIRTIO_BLK_T_IN, 0)
    raw(rig, [(h, 16, N, 0)] * 4)
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_CHAIN_LEN)


def test_segment_limit(rig: Rig) -> None:
    h = rig.header(VIRTIO_BLK_T_IN, 0)
    st = rig.status()
    ok = [(h + i, 1, 0) for i in range(16)] + [(h, 1, 0)] * (1023 - 16) + [(st, 1, W)]
    raw(rig, [(table(rig, ok), 16 * len(ok), I, 0)])
    assert rig.process() == 1
    assert rig.ring.take_used() == [(0, 1)]
    too_many = ok[:-1] + [(h, 1, 0), (st, 1, W)]
    raw(rig, [(table(rig, too_many), 16 * len(too_many), I, 1)])
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_IOV, handled=1)


@pytest.mark.parametrize("bad_id", [16, 17, 0xFFFF])
def test_buffer_id_out_of_range(rig: Rig, bad_id: int) -> None:
    h, st = head_request(rig)
    raw(rig, [(h, 16, N, 0), (st, 1, W, bad_id)])     # the id is the last descriptor's
    assert rig.process() == 0
    assert_broken(rig, lib.VHD_ERR_HEAD)


def test_buffer_id_of_a_chain_in_flight(rig: Rig) -> None:
    """Two chains with one id, both popped before either completes."""
    for _ in range(2):
        h, st = head_request(rig, VIRTIO_BLK_T_FLUSH)
        raw(rig, [(h, 16, N, 9), (st, 1, W, 9)])
    assert rig.pop() == lib.VHD_POP_OK
    assert rig.pop() == lib.VHD_ERR_ID
    assert rig.broken == lib.VHD_ERR_ID and rig.errors() == 1
    assert position(rig)[:2] == (2, True)      # the bad chain was not consumed


def test_buffer_id_may_be_reused_once_used(rig: Rig) -> None:
    for k in range(3):
        h, st = head_request(rig, VIRTIO_BLK_T_FLUSH)
        raw(rig, [(h, 16, N, 4), (st, 1, W, 4)])
        assert rig.process() == 1
        assert rig.ring.take_used() == [(4, 1)]
    assert rig.broken == 0


def test_the_id_of_the_last_descriptor_counts(rig: Rig) -> None:
    h, st = head_request(rig, VIRTIO_BLK_T_FLUSH)
    raw(rig, [(h, 8, N, 3), (h + 8, 8, N, 99), (st, 1, W, 6)])
    assert rig.process() == 1
    assert rig.ring.take_used() == [(6, 1)]


def test_driver_flipping_its_wrap_counter_is_not_seen_as_available(rig: Rig) -> None:
    """A head made available with the other lap's bits (AVAIL=0 USED=1 in
    lap 1) looks like an old descriptor: nothing is consumed or written."""
    ring = pring(rig)
    h, st = head_request(rig, VIRTIO_BLK_T_FLUSH)
    ring.write_desc(0, h, 16, N | ring.avail_flags(False), 0)
    ring.write_desc(1, st, 1, W | ring.avail_flags(False), 0)
    assert rig.process() == 0 and rig.pop() == lib.VHD_POP_EMPTY
    assert rig.broken == 0 and rig.ram.read(st, 1) == b"\xff"
    assert position(rig) == (0, True, 0, True)
    ring.write_desc(1, st, 1, W | ring.avail_flags(True), 0)
    ring.set_desc_flags(0, N | ring.avail_flags(True))       # repaired
    assert rig.process() == 1
    assert rig.ring.take_used() == [(0, 1)]


@pytest.mark.parametrize("bits", [A | U, 0], ids=["lap 1 flags A=U=1", "lap 0 flags A=U=0"])
def test_descriptor_used_in_the_drivers_own_lap_breaks_the_ring(rig_factory: RigFactory, bits: int) -> None:
    """AVAIL == USED == the driver's wrap counter at the device's position:
    neither side ever leaves that there; the driver flipped a counter."""
    rig = rig_factory(num=4)
    ring = pring(rig)
    if bits == 0:      # get the device into lap 0 first
        for _ in range(4):
            h, st = head_request(rig, VIRTIO_BLK_T_FLUSH)
            ring.submit([Buf(h, 16), Buf(st, 1, True)], indirect=True)
        assert rig.process() == 4 and len(ring.take_used()) == 4
        assert position(rig) == (0, False, 0, False)
    h, st = head_request(rig, VIRTIO_BLK_T_FLUSH)
    ring.write_desc(0, h, 16, bits, 0)
    assert rig.process() == 0
    assert rig.broken == lib.VHD_ERR_WRAP and rig.errors() == 1
    assert rig.ram.read(st, 1) == b"\xff"


def test_broken_ring_stays_broken(rig: Rig) -> None:
    good = rig.read_req(0, SECTOR)
    h, st = head_request(rig)
    raw(rig, [(h, 16, N, 0), (st, 1, W, 99)])
    assert rig.process() == 1
    assert rig.ring.take_used() == [(good.head, SECTOR + 1)]
    assert_broken(rig, lib.VHD_ERR_HEAD, handled=1)
    pring(rig).write_desc(2, st, 1, W | pring(rig).avail_flags(True), 1)   # repaired
    for _ in range(3):
        assert rig.process() == 0
        assert rig.pop() == lib.VHD_ERR_HEAD
    assert rig.errors() == 0 and rig.ram.read(st, 1) == b"\xff"
    assert rig.vring.stats().requests == 1


def test_setup_again_clears_broken(rig: Rig) -> None:
    h, st = head_request(rig, VIRTIO_BLK_T_FLUSH)
    raw(rig, [(h, 16, N, 0), (st, 1, W, 77)])
    assert rig.process() == 0 and rig.broken == lib.VHD_ERR_HEAD
    pring(rig).write_desc(1, st, 1, W | pring(rig).avail_flags(True), 1)
    rig.setup()
    assert rig.broken == 0
    assert rig.process() == 1
    assert rig.ring.take_used() == [(1, 1)]


# --- wrap counters, positions, ids --------------------------------------------------

def test_many_laps_with_chains_of_every_length(rig_factory: RigFactory) -> None:
    """Chains of 1..5 descriptors across 12 laps of a size-8 ring: ids come
    back with their lengths, and both positions move by the descriptors used."""
    rig = rig_factory(num=8, region_sizes=(1 << 18, 1 << 18))
    ring = pring(rig)
    descs = 0
    for i in range(60):
        k = i % 5 + 1
        sector = i % 200
        h, st = head_request(rig, VIRTIO_BLK_T_IN, sector)
        data = [rig.alloc(SECTOR // 4 if k > 2 else SECTOR, 16) for _ in range(max(k - 2, 0))]
        if k == 1:
            bufs = [Buf(rig.alloc(struct.pack("<IIQ", VIRTIO_BLK_T_FLUSH, 0, 0)), 16)]
        elif k == 2:
            bufs = [Buf(h, 16), Buf(st, 1, True)]
        else:
            bufs = [Buf(h, 16)] + [Buf(d, SECTOR // 4, True) for d in data[:-1]] + \
                   [Buf(data[-1], SECTOR // 4 * (4 - (k - 3)) % SECTOR or SECTOR // 4, True), Buf(st, 1, True)]
        head = ring.submit(bufs)
        assert rig.process() == 1
        ((id_, _),) = ring.take_used()
        assert id_ == head
        descs += len(bufs)
        pos = descs % 8, (descs // 8) % 2 == 0
        assert position(rig) == (pos[0], pos[1], pos[0], pos[1])
        assert ring.next_avail == pos[0] and ring.last_used == pos[0]
    assert rig.broken == 0 and rig.vring.stats().requests == 60


def test_out_of_order_completion(rig: Rig) -> None:
    """Pop three chains (1, 3 and 2 descriptors), complete them 3rd, 1st, 2nd:
    the used descriptors are written in completion order at the used
    position, each moving it by its own chain's length."""
    ring = pring(rig)
    ids = [ring.submit([Buf(rig.status(), 1, True)] * n) for n in (1, 3, 2)]
    chain = ffi.new("struct vhd_chain *")
    popped = []
    for _ in ids:
        assert lib.vhd_vring_pop(rig.vring.ptr, chain) == lib.VHD_POP_OK
        popped.append(chain.head)
    assert popped == ids
    for id_, n in ((ids[2], 22), (ids[0], 10), (ids[1], 33)):
        lib.vhd_vring_push(rig.vring.ptr, id_, n)
    lib.vhd_vring_flush(rig.vring.ptr)
    assert ring.take_used() == [(ids[2], 22), (ids[0], 10), (ids[1], 33)]
    assert position(rig) == (6, True, 6, True)
    assert [ring.read_desc(p)[2] for p in (0, 2, 3)] == [ids[2], ids[0], ids[1]]   # used at 0, 0+2, 0+2+1


def test_a_batch_is_published_by_its_first_descriptor(rig: Rig) -> None:
    """Pushed used descriptors stay invisible until the flush stores the
    first one's flags (the others are written already)."""
    ring = pring(rig)
    ids = [ring.submit([Buf(rig.status(), 1, True)]) for _ in range(3)]
    chain = ffi.new("struct vhd_chain *")
    for _ in ids:
        assert lib.vhd_vring_pop(rig.vring.ptr, chain) == lib.VHD_POP_OK
    for id_ in ids:
        lib.vhd_vring_push(rig.vring.ptr, id_, 1)
    used = A | U
    assert [ring.read_desc(p)[3] & used for p in range(3)] == [A, used, used]   # first still "available"
    assert ring.take_used() == []
    lib.vhd_vring_flush(rig.vring.ptr)
    assert ring.take_used() == [(i, 1) for i in ids]
    assert rig.vring.stats().batches == 1


@pytest.mark.parametrize("avail_pos, avail_wrap, used_pos, used_wrap",
                         [(5, False, 5, False), (15, True, 15, True), (3, True, 1, True), (2, False, 14, True)])
def test_setup_at_a_base_with_wrap_counters(rig: Rig, avail_pos: int, avail_wrap: bool, used_pos: int,
                                            used_wrap: bool) -> None:
    """SET_VRING_BASE's packed form: index bits 0-14, wrap counter bit 15,
    for the avail (low half) and used (high half) positions; GET gives them back."""
    ring = pring(rig)
    # What the ring holds there: used descriptors of this lap behind the
    # position, of the previous lap from it on.
    for i in range(rig.num):
        ring.set_desc_flags(i, A | U if (i < avail_pos) == avail_wrap else 0)
    ring.next_avail, ring.avail_wrap = avail_pos, avail_wrap
    ring.last_used, ring.used_wrap = avail_pos, avail_wrap
    a, u = avail_pos | avail_wrap << 15, used_pos | used_wrap << 15
    rig.setup(last_avail_idx=a, used_base=u)
    assert rig.vring.base == a | u << 16
    if (a, u) != (avail_pos | avail_wrap << 15,) * 2:
        return           # chains in flight before the restart: only the indexes are checked
    for _ in range(3):
        h, st = head_request(rig, VIRTIO_BLK_T_FLUSH)
        ring.submit([Buf(h, 16), Buf(st, 1, True)])
    assert rig.process() == 3
    assert [n for _, n in ring.take_used()] == [1, 1, 1]
    end = avail_pos + 6
    assert position(rig) == (end % 16, avail_wrap ^ (end >= 16), end % 16, avail_wrap ^ (end >= 16))


# --- event suppression --------------------------------------------------------------

def flushes(rig: Rig, n: int) -> None:
    """n FLUSH requests of one ring descriptor each (indirect)."""
    rig.ring.take_used()
    for _ in range(n):
        h, st = head_request(rig, VIRTIO_BLK_T_FLUSH)
        rig.ring.submit([Buf(h, 16), Buf(st, 1, True)], indirect=True)


def test_driver_event_disable_and_enable(rig: Rig) -> None:
    ring = pring(rig)
    ring.set_driver_event(RING_EVENT_FLAGS_DISABLE)
    flushes(rig, 2)
    assert rig.process() == 2 and rig.calls() == 0
    ring.set_driver_event(RING_EVENT_FLAGS_ENABLE)
    flushes(rig, 1)
    assert rig.process() == 1 and rig.calls() == 1
    # DESC without EVENT_IDX negotiated is taken as ENABLE.
    ring.set_driver_event(RING_EVENT_FLAGS_DESC, 0x7FFF)
    flushes(rig, 1)
    assert rig.process() == 1 and rig.calls() == 1
    assert rig.vring.stats().calls == 2
    # Kicks are on again after processing (no EVENT_IDX: ENABLE).
    assert ring.device_event()[1] == RING_EVENT_FLAGS_ENABLE


def test_event_idx_device_event_tracks_the_next_descriptor(rig_factory: RigFactory) -> None:
    rig = rig_factory(event_idx=True, num=4)
    flushes(rig, 3)
    assert rig.process() == 3
    assert pring(rig).device_event() == (3 | 1 << 15, RING_EVENT_FLAGS_DESC)   # position 3, lap 1
    flushes(rig, 1)
    assert rig.process() == 1
    assert pring(rig).device_event() == (0 | 0 << 15, RING_EVENT_FLAGS_DESC)   # position 0, lap 0
    flushes(rig, 4)
    assert rig.process() == 4
    assert pring(rig).device_event() == (0 | 1 << 15, RING_EVENT_FLAGS_DESC)   # lap 1 again


def test_event_idx_call_only_when_the_used_position_passes_the_event(rig_factory: RigFactory) -> None:
    rig = rig_factory(event_idx=True, num=16)
    ring = pring(rig)
    ring.set_driver_event(RING_EVENT_FLAGS_DESC, 15 | 0 << 15)    # far: the next lap
    flushes(rig, 1)                                  # used position 0 -> 1
    assert rig.process() == 1 and rig.calls() == 1   # the first flush after setup notifies
    flushes(rig, 1)                                  # 1 -> 2
    assert rig.process() == 1 and rig.calls() == 0
    ring.set_driver_event(RING_EVENT_FLAGS_DESC, 9 | 1 << 15)
    flushes(rig, 1)                                  # 2 -> 3
    assert rig.process() == 1 and rig.calls() == 0
    flushes(rig, 7)                                  # 3 -> 10 passes 9: one call for the batch
    assert rig.process() == 7 and rig.calls() == 1
    ring.set_driver_event(RING_EVENT_FLAGS_DESC, 10 | 1 << 15)    # exactly the next one to be used
    flushes(rig, 1)                                  # 10 -> 11 passes 10
    assert rig.process() == 1 and rig.calls() == 1
    ring.set_driver_event(RING_EVENT_FLAGS_DESC, 5 | 1 << 15)     # behind: already passed
    flushes(rig, 1)
    assert rig.process() == 1 and rig.calls() == 0
    ring.set_driver_event(RING_EVENT_FLAGS_DESC, 1 | 0 << 15)     # position 1 of the next lap
    flushes(rig, 4)                                  # 12 -> 16 = 0 (lap 0): not yet past 1
    assert rig.process() == 4 and rig.calls() == 0
    flushes(rig, 2)                                  # 0 -> 2 passes 1 of lap 0
    assert rig.process() == 2 and rig.calls() == 1
    assert ring.take_used() and rig.broken == 0
    assert rig.vring.stats().calls == 4


# --- setup validation ---------------------------------------------------------------------

def setup_raw(rig: Rig, **over: int) -> None:
    ring = rig.ring
    args = dict(num=rig.num, desc=rig.ram.gpa_to_uva(ring.desc), avail=rig.ram.gpa_to_uva(ring.avail),
                used=rig.ram.gpa_to_uva(ring.used), last_avail_idx=0x8000, used_base=0x8000)
    args.update(over)
    v = NativeVring()
    try:
        v.setup(rig.mem, num=args["num"], desc=args["desc"], avail=args["avail"], used=args["used"],
                last_avail_idx=args["last_avail_idx"], used_base=args["used_base"],
                event_idx=True, indirect=True, call_fd=-1, err_fd=-1, packed=True)
        assert v.packed
        return
    finally:
        v.close()


@pytest.mark.parametrize("over, err", [
    ({"num": 0}, errno.EINVAL), ({"num": 32769}, errno.EINVAL),
    ({"last_avail_idx": 16}, errno.EINVAL), ({"used_base": 0x8000 | 16}, errno.EINVAL),
    ({"desc": 8}, errno.EINVAL), ({"avail": 2}, errno.EINVAL), ({"used": 1}, errno.EINVAL),
    ({"desc": -(1 << 30)}, errno.EFAULT), ({"used": 1 << 40}, errno.EFAULT),
])
def test_setup_rejects(rig: Rig, over: dict[str, int], err: int) -> None:
    for k in ("desc", "avail", "used"):
        if k in over:
            over[k] += rig.ram.gpa_to_uva(getattr(rig.ring, k))
    with pytest.raises(NativeError) as ei:
        setup_raw(rig, **over)
    assert ei.value.errno == err


def test_ring_size_need_not_be_a_power_of_two(rig_factory: RigFactory) -> None:
    rig = rig_factory(num=6)
    for i in range(10):
        h, st = head_request(rig, VIRTIO_BLK_T_IN, i)
        d = rig.alloc(SECTOR, 512)
        head = rig.ring.submit([Buf(h, 16), Buf(d, SECTOR, True), Buf(st, 1, True)])
        assert rig.process() == 1
        assert rig.ring.take_used() == [(head, SECTOR + 1)]
        assert rig.ram.read(d, SECTOR) == rig.initial[i * SECTOR:(i + 1) * SECTOR]
    assert position(rig) == (0, False, 0, False)      # 30 descriptors: five laps of 6


def test_device_area_over_the_descriptors_breaks_the_ring(rig: Rig) -> None:
    ring = rig.ring
    rig.vring.setup(rig.mem, num=rig.num, desc=rig.ram.gpa_to_uva(ring.desc), avail=rig.ram.gpa_to_uva(ring.avail),
                    used=rig.ram.gpa_to_uva(ring.desc + 32), last_avail_idx=0x8000, used_base=0x8000,
                    event_idx=False, indirect=True, call_fd=-1, err_fd=ring.err_fd, packed=True)
    rig.ring.submit([Buf(rig.status(), 1, True)])
    assert rig.process() == 0
    assert rig.broken == lib.VHD_ERR_LAYOUT and rig.errors() == 1


def test_status_byte_and_used_length(rig: Rig) -> None:
    """The ordinary case end to end, plus what a split ring has in memory
    (used idx, flags) that a packed one must not write."""
    req = rig.read_req(1, SECTOR)
    assert rig.process() == 1
    assert_ok(rig, req, SECTOR + 1)
    assert rig.status_of(req) == VIRTIO_BLK_S_OK
    assert rig.vring.base == (3 | 1 << 15) | (3 | 1 << 15) << 16


def test_buffer_id_reused_before_its_completion_is_published(rig: Rig) -> None:
    """The driver cannot have seen a pushed but unpublished completion: a
    chain reusing that id breaks the ring (found by fuzz_vring_packed, where
    it left an inflight entry marked in flight)."""
    for _ in range(2):
        h, st = head_request(rig, VIRTIO_BLK_T_FLUSH)
        raw(rig, [(h, 16, N, 3), (st, 1, W, 3)])
    assert rig.pop() == lib.VHD_POP_OK
    lib.vhd_vring_push(rig.vring.ptr, 3, 1)
    assert rig.pop() == lib.VHD_ERR_ID
    lib.vhd_vring_flush(rig.vring.ptr)
    assert rig.ring.take_used() == [(3, 1)]
    assert rig.broken == lib.VHD_ERR_ID
