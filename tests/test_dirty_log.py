"""The dirty-page log (VHOST_F_LOG_ALL, SET_LOG_BASE): every byte the C data
plane writes into guest memory sets exactly its page's bit, and no other.

Rings are driven by the Python front-end's ring layout over memfd guest RAM
(vhd_helpers), the bitmap is a memfd as QEMU's is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from test_net import NetRig, frame, vnet_hdr
from vhd_helpers import SECTOR, DirtyBitmap, Rig, pages_of
from vhostd.frontend import Buf
from vhostd.native import NativeBlkQueue, NativeLog, NativeNetCtrl

RigFactory = Callable[..., Rig]
LOG_SIZE = 4096          # covers 128 MiB of guest-physical space, the rigs use 2 MiB


@pytest.fixture
def bitmap() -> Iterator[DirtyBitmap]:
    b = DirtyBitmap(LOG_SIZE)
    yield b
    b.close()


@pytest.fixture
def log(bitmap: DirtyBitmap) -> Iterator[NativeLog]:
    n = bitmap.native()
    yield n
    n.close()


def used_pages(used_gpa: int, num: int, elems: range) -> set[int]:
    """used->flags/idx and the elements written (and avail_event)."""
    out = pages_of(used_gpa, 4)
    for i in elems:
        out |= pages_of(used_gpa + 4 + 8 * (i % num), 8)
    return out


def test_blk_read_logs_data_status_and_used_ring_only(rig_factory: RigFactory, bitmap: DirtyBitmap,
                                                       log: NativeLog) -> None:
    rig = rig_factory(region_sizes=(1 << 20, 1 << 20))
    rig.setup(log=log, log_used_gpa=rig.ring.used)
    req = rig.read_req(8, 3 * 4096)
    rig.process()
    assert rig.data_of(req) == rig.initial[8 * SECTOR: 8 * SECTOR + 3 * 4096]
    expected = pages_of(req.in_gpa, 3 * 4096) | pages_of(req.status_gpa, 1) | used_pages(rig.ring.used, rig.num, range(1))
    assert bitmap.pages() == expected
    assert log.stats().refused == 0 and log.stats().pages >= len(expected)


def test_blk_write_logs_status_and_used_ring_not_the_data(rig_factory: RigFactory, bitmap: DirtyBitmap,
                                                          log: NativeLog) -> None:
    rig = rig_factory(region_sizes=(1 << 20, 1 << 20))
    rig.setup(log=log, log_used_gpa=rig.ring.used)
    data = bytes(range(256)) * 32
    req = rig.write_req(0, data)
    rig.process()
    assert rig.file()[: len(data)] == data
    assert bitmap.pages() == pages_of(req.status_gpa, 1) | used_pages(rig.ring.used, rig.num, range(1))


def test_get_id_logs_the_serial_bytes(rig_factory: RigFactory, bitmap: DirtyBitmap, log: NativeLog) -> None:
    from vhostd.frontend import VIRTIO_BLK_T_GET_ID
    rig = rig_factory()
    rig.setup(log=log, log_used_gpa=rig.ring.used)
    req = rig.request(VIRTIO_BLK_T_GET_ID, 0, read_len=20)
    rig.process()
    assert rig.data_of(req)[:6] == b"SER123"
    assert pages_of(req.in_gpa, 20) <= bitmap.pages()


def test_used_ring_is_logged_at_log_guest_addr_not_at_its_translation(
        rig_factory: RigFactory, bitmap: DirtyBitmap, log: NativeLog) -> None:
    """QEMU gives the used ring's guest-physical address in log_guest_addr;
    the back-end must log there (what the front-end tracks), even if it
    differs from where the ring's front-end address translates."""
    rig = rig_factory(region_sizes=(1 << 20, 1 << 20))
    elsewhere = 0x40_0000
    rig.setup(log=log, log_used_gpa=elsewhere)
    req = rig.write_req(0, b"x" * SECTOR)
    rig.process()
    assert bitmap.pages() == pages_of(req.status_gpa, 1) | used_pages(elsewhere, rig.num, range(1))


def test_without_vring_f_log_only_data_is_logged(rig_factory: RigFactory, bitmap: DirtyBitmap,
                                                 log: NativeLog) -> None:
    rig = rig_factory(region_sizes=(1 << 20, 1 << 20))
    rig.setup(log=log, log_used_gpa=None)
    req = rig.read_req(0, 4096)
    rig.process()
    assert bitmap.pages() == pages_of(req.in_gpa, 4096) | pages_of(req.status_gpa, 1)


def test_logging_off_sets_nothing(rig_factory: RigFactory, bitmap: DirtyBitmap) -> None:
    rig = rig_factory()
    rig.setup(log=None)
    rig.read_req(0, 4096)
    rig.process()
    assert bitmap.pages() == set()


def test_bits_past_the_log_are_refused_not_written(rig_factory: RigFactory) -> None:
    """A log too small for guest memory is the front-end's error: those
    pages are counted as refused and nothing is written past the bitmap."""
    rig = rig_factory(region_sizes=(1 << 20, 1 << 20))
    small = DirtyBitmap(size=(rig.ram.end >> 12) // 8 - 16)    # misses the top 128 pages
    nlog = small.native()
    try:
        rig.setup(log=nlog, log_used_gpa=rig.ring.used)
        top = rig.ram.end - 64 * 4096
        rig.ram._next = top                    # the read buffer in the uncovered part
        req = rig.read_req(0, 8192)
        rig.process()
        assert req.in_gpa >= top
        assert nlog.stats().refused >= 2
        assert small.beyond_is_clean()
        covered = {p for p in pages_of(req.status_gpa, 1) if p < small.size * 8}
        assert covered <= small.pages()
    finally:
        nlog.close()
        small.close()


def test_toggling_the_log_mid_stream_logs_exactly_the_logged_requests(
        rig_factory: RigFactory, bitmap: DirtyBitmap, log: NativeLog) -> None:
    rig = rig_factory(region_sizes=(1 << 20, 1 << 20))
    rig.read_req(0, 4096)
    rig.process()
    rig.setup(last_avail_idx=rig.vring.last_avail_idx, log=log, log_used_gpa=rig.ring.used)
    during = rig.read_req(8, 4096)
    rig.process()
    rig.setup(last_avail_idx=rig.vring.last_avail_idx, log=None)
    rig.read_req(16, 4096)
    rig.process()
    assert bitmap.pages() == (pages_of(during.in_gpa, 4096) | pages_of(during.status_gpa, 1)
                              | used_pages(rig.ring.used, rig.num, range(1, 2)))


def test_a_replaced_log_loses_no_bit(rig_factory: RigFactory) -> None:
    """SET_LOG_BASE while the ring runs: every write before the switch is in
    the old bitmap, every write after it in the new one."""
    rig = rig_factory(region_sizes=(1 << 20, 1 << 20))
    old, new = DirtyBitmap(LOG_SIZE), DirtyBitmap(2 * LOG_SIZE)
    nold, nnew = old.native(), new.native()
    try:
        rig.setup(log=nold, log_used_gpa=rig.ring.used)
        first = [rig.read_req(i * 8, 4096) for i in range(4)]
        rig.process()
        assert len(rig.ring.take_used()) == 4
        rig.setup(last_avail_idx=rig.vring.last_avail_idx, log=nnew, log_used_gpa=rig.ring.used)
        second = [rig.read_req(i * 8, 4096) for i in range(4, 8)]
        rig.process()
        for r in first:
            assert pages_of(r.in_gpa, 4096) | pages_of(r.status_gpa, 1) <= old.pages()
        for r in second:
            assert pages_of(r.in_gpa, 4096) | pages_of(r.status_gpa, 1) <= new.pages()
    finally:
        nold.close()
        nnew.close()
        old.close()
        new.close()


def test_io_uring_reads_are_logged_on_completion(rig_factory: RigFactory, bitmap: DirtyBitmap,
                                                 log: NativeLog) -> None:
    rig = rig_factory(region_sizes=(1 << 20, 1 << 20), sectors=2048)
    rig.setup(log=log, log_used_gpa=rig.ring.used)
    reqs = [rig.read_req(i * 64, 32 * 1024, indirect=True) for i in range(4)]
    rig.process_uring()
    expected = used_pages(rig.ring.used, rig.num, range(4))
    for r in reqs:
        expected |= pages_of(r.in_gpa, 32 * 1024) | pages_of(r.status_gpa, 1)
    assert bitmap.pages() == expected


def test_a_read_served_in_two_parts_logs_both(rig_factory: RigFactory, bitmap: DirtyBitmap,
                                              log: NativeLog) -> None:
    """The io_uring engine copies what the page cache holds at once
    (RWF_NOWAIT) and reads the rest through io_uring: the first part's pages
    must be logged too, although its iovecs are dropped before completion
    (a guest migrated under buffered reads crashed on the destination)."""
    rig = rig_factory(region_sizes=(1 << 20, 1 << 20), sectors=2048)
    rig.setup(log=log, log_used_gpa=rig.ring.used)
    # The first 4 KiB of the request in the page cache, the next 60 KiB not.
    fd = os.open(rig.image, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    req = rig.read_req(0, 64 * 1024)
    rig.process_uring()
    assert rig.data_of(req) == rig.initial[:64 * 1024]
    expected = pages_of(req.in_gpa, 64 * 1024) | pages_of(req.status_gpa, 1)
    assert bitmap.pages() == expected | used_pages(rig.ring.used, rig.num, range(1))


# --- net ---------------------------------------------------------------------

def _net_rig_with_log(log: NativeLog, num: int = 64) -> NetRig:
    rig = NetRig(num=num)
    for ring, v in ((rig.rx, rig.vrx), (rig.tx, rig.vtx)):
        v.setup(rig.mem, num=num, desc=rig.ram.gpa_to_uva(ring.desc),
                avail=rig.ram.gpa_to_uva(ring.avail), used=rig.ram.gpa_to_uva(ring.used),
                last_avail_idx=0, event_idx=False, indirect=True,
                call_fd=ring.call_fd, err_fd=ring.err_fd, log=log, log_used_gpa=ring.used)
    return rig


def test_net_rx_logs_header_and_frame_of_every_merged_buffer(bitmap: DirtyBitmap, log: NativeLog) -> None:
    rig = _net_rig_with_log(log)
    try:
        gpas = rig.post_rx(1500, 1500, 1500, 1500)
        bitmap.take()
        f = frame(5000)
        rig.peer.send(vnet_hdr() + f)
        rig.run_rx()
        used = rig.rx.take_used()
        assert [n for _, n in used] == [1500, 1500, 1500, 512]
        expected = used_pages(rig.rx.used, 64, range(4))
        for g, (_, n) in zip(gpas, used):
            expected |= pages_of(g, n)
        assert bitmap.pages() == expected
    finally:
        rig.close()


def test_net_tx_logs_only_the_used_ring(bitmap: DirtyBitmap, log: NativeLog) -> None:
    rig = _net_rig_with_log(log)
    try:
        rig.send(vnet_hdr(), frame(300))
        bitmap.take()
        rig.run_tx()
        assert rig.received()
        assert bitmap.pages() == used_pages(rig.tx.used, 64, range(1))
    finally:
        rig.close()


def test_net_ctrl_ack_is_logged(bitmap: DirtyBitmap, log: NativeLog) -> None:
    rig = _net_rig_with_log(log)
    ctl = NativeNetCtrl(1)
    try:
        from vhostd.frontend import DriverRing
        from vhostd.native import NativeVring
        cq = DriverRing(rig.ram, 2, 16)
        vcq = NativeVring()
        vcq.setup(rig.mem, num=16, desc=rig.ram.gpa_to_uva(cq.desc), avail=rig.ram.gpa_to_uva(cq.avail),
                  used=rig.ram.gpa_to_uva(cq.used), last_avail_idx=0, event_idx=False, indirect=True,
                  call_fd=cq.call_fd, err_fd=cq.err_fd, log=log, log_used_gpa=cq.used)
        cmd = rig.ram.alloc(3)
        rig.ram.write(cmd, bytes([0, 0, 1]))     # VIRTIO_NET_CTRL_RX, PROMISC on
        ack = rig.ram.alloc(1, 1)
        cq.submit([Buf(cmd, 3), Buf(ack, 1, writable=True)])
        bitmap.take()
        vcq.process(NativeNetCtrl.kind, ctl.ptr)
        assert cq.take_used() == [(0, 1)]
        assert bitmap.pages() == pages_of(ack, 1) | used_pages(cq.used, 16, range(1))
        vcq.close()
        cq.close()
    finally:
        ctl.close()
        rig.close()


def test_log_bit_arithmetic_at_the_edges(bitmap: DirtyBitmap, log: NativeLog) -> None:
    log.write(4095, 2)                   # straddles pages 0 and 1
    log.write(8 * LOG_SIZE * 4096 - 1, 1)   # the last page the log covers
    log.write(8 * LOG_SIZE * 4096, 1)       # the first it does not
    log.write((1 << 64) - 4096, 4096)       # the top of the address space
    assert bitmap.pages() == {0, 1, 8 * LOG_SIZE - 1}
    assert log.stats().refused == 2
    assert bitmap.beyond_is_clean()


def test_size_for_covers_the_last_byte() -> None:
    assert NativeLog.size_for(0) == 0
    assert NativeLog.size_for(1) == 1
    assert NativeLog.size_for(8 * 4096) == 1
    assert NativeLog.size_for(8 * 4096 + 1) == 2
    assert NativeLog.size_for(4 << 30) == (4 << 30) // 4096 // 8
