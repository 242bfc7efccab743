"""Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): requests a
dead back-end had popped but not completed are resubmitted by the next one,
in order, exactly once; completed ones are not repeated."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest

import vhostd_proc
from vhd_helpers import SECTOR, Rig
from vhostd._native import ffi, lib
from vhostd.frontend import Buf, DriverRing, Frontend, GuestRam
from vhostd.native import inflight_queue_size
from vhostd.protocol.constants import ProtocolFeature, Request, VirtioFeature, bit
from vhostd.protocol.messages import Inflight

PROTO = (bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
         | bit(ProtocolFeature.INFLIGHT_SHMFD))
FEATURES = bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
NUM = 16
REGION_HDR = struct.Struct("<QHHHH")      # features, version, desc_num, last_batch_head, used_idx
DESC = struct.Struct("<B5xHQ")            # inflight, next, counter


def _connect(sock: Path) -> Frontend:
    fe = Frontend(str(sock))
    _, proto = fe.negotiate(FEATURES, PROTO)
    assert proto & bit(ProtocolFeature.INFLIGHT_SHMFD)
    return fe


def _write_req(ram: GuestRam, ring: DriverRing, sector: int, byte: int) -> tuple[int, int]:
    hdr = ram.alloc(16)
    ram.write(hdr, struct.pack("<IIQ", 1, 0, sector))
    data = ram.alloc(512, 512)
    ram.write(data, bytes([byte]) * 512)
    st = ram.alloc(1, 1)
    ram.write(st, b"\xff")
    return ring.add_chain([Buf(hdr, 16), Buf(data, 512), Buf(st, 1, writable=True)]), st


@pytest.mark.parametrize("engine", ["io_uring", "sync"])
def test_get_inflight_fd_buffer_tracks_completions(tmp_path: Path, engine: str) -> None:
    image = vhostd_proc.sparse_image(tmp_path / "d.img", 1 << 20)
    with vhostd_proc.blk(tmp_path, image, "--aio", engine) as v:
        fe = _connect(v.listening_socket)
        fe.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, NUM).pack())
        reply, fds = fe.recv_reply_fds(Request.GET_INFLIGHT_FD)
        info = Inflight.unpack(reply)
        assert len(fds) == 1 and info.mmap_size == inflight_queue_size(NUM)
        buf = mmap.mmap(fds[0], info.mmap_size)
        os.close(fds[0])
        ram = GuestRam([1 << 20])
        fe.set_mem_table(ram)
        ring = DriverRing(ram, 0, NUM)
        fe.start_ring(ring)
        for i in range(5):
            head, _ = _write_req(ram, ring, i, i)
            ring.push_avail(head)
        ring.kick()
        ring.wait_used(5)
        _, version, desc_num, _, used_idx = REGION_HDR.unpack_from(buf)
        assert (version, desc_num, used_idx) == (1, NUM, 5)
        assert all(DESC.unpack_from(buf, REGION_HDR.size + 16 * i)[0] == 0 for i in range(NUM))
        fe.close()


@pytest.mark.parametrize("done, flags_cleared", [(1, True), (0, False)],
                         ids=["completed out of order", "died between used->idx and clearing the flag"])
def test_restarted_backend_resubmits_in_flight_requests_once(tmp_path: Path, done: int,
                                                             flags_cleared: bool) -> None:
    """The dead back-end popped requests 0 and 1 (counters 7, 8) and completed
    one of them (`done`), publishing used->idx=1; request 2 was never popped.
    Without inflight tracking the new back-end would start at avail index 1
    (QEMU sends used->idx as the base): it would repeat request 1 and lose 0."""
    image = vhostd_proc.sparse_image(tmp_path / "d.img", 1 << 20)
    ram = GuestRam([1 << 20])
    ring = DriverRing(ram, 0, NUM)
    reqs = [_write_req(ram, ring, 10 + i, 0xA0 + i) for i in range(3)]
    heads = [h for h, _ in reqs]
    for h in heads:
        ring.push_avail(h)
    size = inflight_queue_size(NUM)
    fd = os.memfd_create("test-inflight")
    os.ftruncate(fd, size)
    region = mmap.mmap(fd, size)
    REGION_HDR.pack_into(region, 0, 0, 1, NUM, 0, 1 if flags_cleared else 0)
    for i, counter in ((0, 7), (1, 8)):
        in_flight = not (i == done and flags_cleared)
        DESC.pack_into(region, REGION_HDR.size + 16 * heads[i], int(in_flight), 0, counter)
    ram.write(ring.used + 4, struct.pack("<II", heads[done], 1))
    ram.write(ring.used + 2, struct.pack("<H", 1))
    ram.write(reqs[done][1], b"\x00")
    with open(image, "r+b") as f:
        f.seek((10 + done) * 512)
        f.write(bytes([0xA0 + done]) * 512)
    with vhostd_proc.blk(tmp_path, image) as v:
        fe = _connect(v.listening_socket)
        fe.send(Request.SET_INFLIGHT_FD, Inflight(size, 0, 1, NUM).pack(), [fd])
        fe.set_mem_table(ram)
        fe.start_ring(ring, base=ring.used_idx())
        ring.kick()
        ring.wait_used(3)   # the driver had not looked at the used ring yet
        fe.close()
    used = [struct.unpack("<II", ram.read(ring.used + 4 + 8 * i, 8))[0] for i in range(3)]
    other = 1 - done
    # Each request completed exactly once: the one still in flight resubmitted, then the new one.
    assert ring.used_idx() == 3 and used == [heads[done], heads[other], heads[2]], used
    with open(image, "rb") as f:
        for i in range(3):
            f.seek((10 + i) * 512)
            assert f.read(512) == bytes([0xA0 + i]) * 512
    assert all(ram.read(st, 1) == b"\x00" for _, st in reqs)
    _, version, _, _, used_idx = REGION_HDR.unpack_from(region)
    assert used_idx == 3
    assert all(DESC.unpack_from(region, REGION_HDR.size + 16 * i)[0] == 0 for i in range(NUM))
    os.close(fd)


def test_resubmits_are_pending_work_until_popped(tmp_path: Path) -> None:
    """A back-end whose slots fill up with resubmitted requests comes back for
    the rest because the ring still reports work, though the driver added
    nothing new (found by fuzz_vring_blk where io_uring completes late)."""
    rig = Rig(tmp_path, num=NUM)
    try:
        reqs = [rig.write_req(i, bytes([0xB0 + i]) * SECTOR, indirect=True) for i in range(12)]
        region = ffi.new("uint8_t[]", inflight_queue_size(NUM))
        REGION_HDR.pack_into(ffi.buffer(region), 0, 0, 1, NUM, 0, 0)
        for counter, req in enumerate(reqs, 1):
            DESC.pack_into(ffi.buffer(region), REGION_HDR.size + 16 * req.head, 1, 0, counter)
        rig.vring.setup(rig.mem, num=NUM, desc=rig.ram.gpa_to_uva(rig.ring.desc),
                        avail=rig.ram.gpa_to_uva(rig.ring.avail), used=rig.ram.gpa_to_uva(rig.ring.used),
                        last_avail_idx=0, event_idx=False, indirect=True, call_fd=rig.ring.call_fd,
                        err_fd=rig.ring.err_fd, inflight=region)
        assert rig.vring.last_avail_idx == 12   # every avail entry was popped before the restart
        assert lib.vhd_vring_pending(rig.vring.ptr) == 1
        for _ in range(11):
            assert rig.pop() == lib.VHD_POP_OK
            assert lib.vhd_vring_pending(rig.vring.ptr) == 1
        assert rig.pop() == lib.VHD_POP_OK
        assert lib.vhd_vring_pending(rig.vring.ptr) == 0
        assert rig.pop() == lib.VHD_POP_EMPTY
    finally:
        rig.close()


def test_more_completions_than_ring_entries_between_flushes_clear_every_mark(tmp_path: Path) -> None:
    """Two resubmitted requests plus three new avail entries (the guest lists
    one head twice) are five completions in one batch on a ring of four: the
    list of unpublished heads is published early, and no head stays marked
    in flight once the used index covers it (found by fuzz_vring_blk)."""
    num = 4
    rig = Rig(tmp_path, num=num)
    try:
        heads = []
        for i in range(num):
            h = rig.header(1, i)
            data = rig.alloc(bytes([0xC0 + i]) * SECTOR, 512)
            heads.append(rig.ring.add_chain([Buf(h, 16), Buf(data, SECTOR), Buf(rig.status(), 1, writable=True)],
                                            indirect=True))
        a, b, c, d = heads
        for head in (d, b, a, a, c):     # d and b were popped by the back-end that died
            rig.ring.push_avail(head)
        region = ffi.new("uint8_t[]", inflight_queue_size(num))
        REGION_HDR.pack_into(ffi.buffer(region), 0, 0, 1, num, 0, 0)
        for counter, head in ((10, d), (11, b)):
            DESC.pack_into(ffi.buffer(region), REGION_HDR.size + 16 * head, 1, 0, counter)
        rig.vring.setup(rig.mem, num=num, desc=rig.ram.gpa_to_uva(rig.ring.desc),
                        avail=rig.ram.gpa_to_uva(rig.ring.avail), used=rig.ram.gpa_to_uva(rig.ring.used),
                        last_avail_idx=0, event_idx=False, indirect=True, call_fd=rig.ring.call_fd,
                        err_fd=rig.ring.err_fd, inflight=region)
        assert rig.process() == 5
        assert rig.vring.used_idx == 5   # (the used ring of 4 wrapped: the guest's doing)
        _, _, _, _, used_idx = REGION_HDR.unpack_from(ffi.buffer(region))
        assert used_idx == 5
        assert [DESC.unpack_from(ffi.buffer(region), REGION_HDR.size + 16 * i)[0] for i in range(num)] == [0] * num
    finally:
        rig.close()
