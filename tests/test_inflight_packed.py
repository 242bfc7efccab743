"""Inflight I/O tracking on packed rings (vhost-user.rst, "Inflight I/O
tracking", QueueRegionPacked / DescStatePacked): a back-end that dies with
requests popped, with a batch of completions half published, or in the
middle of a pop, is followed by one that completes every request exactly
once, resubmitting in pop order, and takes the ring's positions from the
region (QEMU sends the packed base it last knew, which is stale after a
crash)."""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

import pytest

from vhd_helpers import SECTOR, Req, Rig
from vhostd._native import ffi, lib
from vhostd.frontend import PACKED_INITIAL_BASE, Buf, PackedDriverRing
from vhostd.native import inflight_queue_size

pytestmark = pytest.mark.usefixtures("watchdog")

NUM = 16
HDR = struct.Struct("<QHHHHHHBB")      # features, version, desc_num, free_head, old_free_head,
#                                        used_idx, old_used_idx, used_wrap_counter, old_used_wrap_counter
DESC = struct.Struct("<BBHHHQHHIQ")    # inflight, padding, next, last, num, counter, id, flags, len, addr
DESC_AT = 32
assert DESC.size == 32


def region_header(region: object) -> dict[str, int]:
    names = ("features", "version", "desc_num", "free_head", "old_free_head", "used_idx", "old_used_idx",
             "used_wrap", "old_used_wrap")
    return dict(zip(names, HDR.unpack_from(ffi.buffer(region))))


def entry(region: object, i: int) -> tuple[int, ...]:
    return DESC.unpack_from(ffi.buffer(region), DESC_AT + 32 * i)


def free_list(region: object) -> list[int]:
    h = region_header(region)
    out: list[int] = []
    i = h["free_head"]
    while i < NUM and len(out) <= NUM:
        out.append(i)
        i = entry(region, i)[2]
    return out


def new_region() -> object:
    return ffi.new("uint8_t[]", inflight_queue_size(NUM, packed=True))


def test_region_size_is_the_packed_layout() -> None:
    assert inflight_queue_size(NUM, packed=True) == (32 + 32 * NUM + 63) // 64 * 64
    assert inflight_queue_size(256, packed=True) == 32 + 32 * 256 + 32   # rounded to 64 bytes
    assert inflight_queue_size(NUM) != inflight_queue_size(NUM, packed=True)


def make(tmp_path: Path) -> tuple[Rig, object]:
    rig = Rig(tmp_path, num=NUM, packed=True)
    region = new_region()
    rig.setup(inflight=region)
    return rig, region


def write_req(rig: Rig, i: int) -> Req:
    """A 3-descriptor write of sector 10+i filled with 0xA0+i."""
    return rig.write_req(10 + i, bytes([0xA0 + i]) * SECTOR)


def test_new_region_is_initialised_and_tracks_the_ring(tmp_path: Path) -> None:
    rig, region = make(tmp_path)
    try:
        h = region_header(region)
        assert (h["version"], h["desc_num"], h["used_idx"], h["used_wrap"]) == (1, NUM, 0, 1)
        assert free_list(region) == list(range(NUM))
        reqs = [write_req(rig, i) for i in range(2)]
        assert rig.process() == 2
        assert [i for i, _ in rig.ring.take_used()] == [r.head for r in reqs]
        h = region_header(region)
        assert (h["used_idx"], h["old_used_idx"], h["used_wrap"]) == (6, 6, 1)
        assert h["free_head"] == h["old_free_head"]
        assert sorted(free_list(region)) == list(range(NUM))       # every entry back
        assert all(entry(region, i)[0] == 0 for i in range(NUM))
    finally:
        rig.close()


def pop(rig: Rig) -> int:
    c = ffi.new("struct vhd_chain *")
    assert lib.vhd_vring_pop(rig.vring.ptr, c) == lib.VHD_POP_OK
    return int(c.head)


def snapshot(region: object) -> bytes:
    return bytes(ffi.buffer(region))


def restore(region: object, data: bytes) -> None:
    ffi.buffer(region)[:] = data


def put_header(region: object, **fields: int) -> None:
    h = region_header(region)
    h.update(fields)
    HDR.pack_into(ffi.buffer(region), 0, *h.values())


CASES = ["nothing completed", "batch published", "died before publishing a batch",
         "died after publishing a batch", "died in a pop"]


@pytest.mark.parametrize("case", CASES)
def test_restart_completes_every_request_exactly_once(tmp_path: Path, case: str) -> None:
    rig, region = make(tmp_path)
    ring = rig.ring
    assert isinstance(ring, PackedDriverRing)
    try:
        reqs = [write_req(rig, i) for i in range(5)]       # 15 descriptors of the 16
        # The back-end that dies: pops the first two, completes or not...
        popped = [pop(rig), pop(rig)]
        assert popped == [reqs[0].head, reqs[1].head]
        if case not in ("nothing completed", "died in a pop"):
            before = snapshot(region)
            first_flags = ring.read_desc(0)[3]
            for i in (0, 1):          # the dead back-end did these two writes
                rig.ram.write(reqs[i].status_gpa, b"\x00")
                with open(rig.image, "r+b") as f:
                    f.seek((10 + i) * SECTOR)
                    f.write(bytes([0xA0 + i]) * SECTOR)
            lib.vhd_vring_push(rig.vring.ptr, popped[1], 1)     # out of order
            lib.vhd_vring_push(rig.vring.ptr, popped[0], 1)
            lib.vhd_vring_flush(rig.vring.ptr)
            after = snapshot(region)
            old = region_header(_view(before))
            if case in ("died before publishing a batch", "died after publishing a batch"):
                # Steps 1-5 done (entries freed, used_idx moved), 7-8 not.
                restore(region, after)
                put_header(region, old_free_head=old["old_free_head"], old_used_idx=old["old_used_idx"],
                           old_used_wrap=old["old_used_wrap"])
                for e in range(NUM):
                    if entry(_view(before), e)[0] == 1:
                        ffi.buffer(region)[DESC_AT + 32 * e] = b"\x01"
                if case == "died before publishing a batch":
                    ring.set_desc_flags(0, first_flags)         # the release store never happened
        if case == "died in a pop":
            # Pops reqs[2] but dies between marking it in flight and old_free_head.
            before = snapshot(region)
            pop(rig)
            put_header(region, old_free_head=region_header(_view(before))["old_free_head"])
        completed_before = {"nothing completed": [], "batch published": popped[::-1],
                            "died before publishing a batch": [],
                            "died after publishing a batch": popped[::-1], "died in a pop": []}[case]
        # ... and the next back-end starts from the stale base QEMU sends.
        rig.setup(last_avail_idx=PACKED_INITIAL_BASE & 0xFFFF, used_base=PACKED_INITIAL_BASE >> 16,
                  inflight=region)
        resubmitted = rig.vring.stats().resubmitted
        assert rig.process() == 5 - len(completed_before)
        used = [i for i, _ in ring.take_used()]
        # Exactly once each, resubmitted ones first in pop order, then the rest in ring order.
        expect = completed_before + [h for h in popped if h not in completed_before] + \
            [r.head for r in reqs[2:]]
        assert used == expect, (case, used, expect)
        assert resubmitted == len([h for h in popped if h not in completed_before])
        assert rig.broken == 0
        assert all(rig.status_of(r) == 0 for r in reqs)
        data = rig.file()
        for i in range(5):
            assert data[(10 + i) * SECTOR:(11 + i) * SECTOR] == bytes([0xA0 + i]) * SECTOR
        h = region_header(region)
        assert h["used_idx"] == h["old_used_idx"] == 15 and h["used_wrap"] == 1
        assert sorted(free_list(region)) == list(range(NUM))
        assert all(entry(region, i)[0] == 0 for i in range(NUM))
    finally:
        rig.close()


def _view(data: bytes) -> object:
    buf = ffi.new("uint8_t[]", len(data))
    ffi.buffer(buf)[:] = data
    return buf


def test_corrupt_region_breaks_the_ring_instead_of_resubmitting_garbage(tmp_path: Path) -> None:
    """A region claiming more descriptors in flight than the ring holds."""
    rig, region = make(tmp_path)
    try:
        reqs = [write_req(rig, i) for i in range(2)]
        pop(rig)
        pop(rig)
        ffi.buffer(region)[DESC_AT + 6: DESC_AT + 8] = struct.pack("<H", NUM)      # entry 0: num = 8
        rig.setup(inflight=region)
        assert rig.broken == lib.VHD_ERR_INFLIGHT and rig.errors() == 1
        assert rig.process() == 0 and rig.status_of(reqs[0]) == 0xFF
    finally:
        rig.close()


def test_session_gives_a_packed_region_and_restores_it(tmp_path: Path) -> None:
    """GET_INFLIGHT_FD after SET_FEATURES with RING_PACKED: the packed layout
    (QEMU sets features first, vhost_dev_prepare_inflight); a second
    back-end given it with SET_INFLIGHT_FD resubmits from it."""
    import vhostd_proc
    from vhostd.frontend import Frontend, GuestRam
    from vhostd.protocol.constants import ProtocolFeature, Request, VirtioFeature, bit
    from vhostd.protocol.messages import Inflight

    proto = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.INFLIGHT_SHMFD)
    feats = bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES) | \
        bit(VirtioFeature.RING_PACKED)
    image = vhostd_proc.sparse_image(tmp_path / "d.img", 1 << 20)
    ram = GuestRam([1 << 20])
    ring = PackedDriverRing(ram, 0, NUM)
    with vhostd_proc.blk(tmp_path, image) as v:
        fe = Frontend(str(v.listening_socket))
        fe.negotiate(feats, proto, packed=True)
        fe.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, NUM).pack())
        reply, fds = fe.recv_reply_fds(Request.GET_INFLIGHT_FD)
        info = Inflight.unpack(reply)
        assert info.mmap_size == inflight_queue_size(NUM, packed=True)
        buf = mmap.mmap(fds[0], info.mmap_size)
        fe.set_mem_table(ram)
        fe.start_ring(ring)
        for i in range(3):
            hdr = ram.alloc(16)
            ram.write(hdr, struct.pack("<IIQ", 1, 0, i))
            data = ram.alloc(512, 512)
            ram.write(data, bytes([0x50 + i]) * 512)
            st = ram.alloc(1, 1)
            ring.submit([Buf(hdr, 16), Buf(data, 512), Buf(st, 1, True)])
        ring.kick()
        assert len(ring.wait_used(3)) == 3
        version, desc_num, _, _, used_idx = struct.unpack_from("<HHHHH", buf, 8)
        assert (version, desc_num, used_idx, buf[20]) == (1, NUM, 9, 1)   # 9 descriptors, lap 1
        fe.close()
        # A front-end that restarts with the buffer and a stale base: the ring goes on where it was.
        deadline = time.monotonic() + 5
        while "front-end disconnected" not in v.log():
            assert time.monotonic() < deadline, v.log()
            time.sleep(0.01)
        fe = Frontend(str(v.listening_socket))
        fe.negotiate(feats, proto, packed=True)
        fe.send(Request.SET_INFLIGHT_FD, Inflight(info.mmap_size, 0, 1, NUM).pack(), [fds[0]])
        fe.set_mem_table(ram)
        fe.start_ring(ring, base=PACKED_INITIAL_BASE)
        hdr = ram.alloc(16)
        ram.write(hdr, struct.pack("<IIQ", 8, 0, 0))      # GET_ID
        st = ram.alloc(1, 1)
        idb = ram.alloc(20)
        ring.submit([Buf(hdr, 16), Buf(idb, 20, True), Buf(st, 1, True)])
        ring.kick()
        ((_, n),) = ring.wait_used(1)
        assert n == 21 and ram.read(st, 1) == b"\x00"
        fe.close()
        os.close(fds[0])
        buf.close()
