"""vhost-user sessions over a real socket: a ``vhostd blk`` subprocess driven
by the Python front-end (negotiation, config, acks, ring lifecycle, memory
swaps, malformed messages, a second front-end, reconnects)."""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from vhd_helpers import SECTOR, Attached, Daemon, attach, pattern
from vhostd.devices.blk import SEG_MAX, SIZE_MAX, BlkFeature
from vhostd.frontend import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlkDriver,
    Buf,
    DriverRing,
    Frontend,
    GuestRam,
)
from vhostd.protocol.constants import (
    VRING_NOFD_MASK,
    HeaderFlag,
    ProtocolFeature,
    Request,
    VirtioFeature,
    bit,
)
from vhostd.protocol.messages import Config, LogBase, MemRegion, MemTable, U64, VringAddr, VringState

pytestmark = pytest.mark.usefixtures("watchdog")

V = int(HeaderFlag.VERSION)
ALL_PROTOCOL = (bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
                | bit(ProtocolFeature.LOG_SHMFD) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
                | bit(ProtocolFeature.BACKEND_REQ))
BLK_FEATURES = (bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.RING_INDIRECT_DESC)
                | bit(VirtioFeature.RING_EVENT_IDX) | bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
                | bit(VirtioFeature.LOG_ALL) | bit(VirtioFeature.RING_PACKED)
                | bit(BlkFeature.SIZE_MAX) | bit(BlkFeature.SEG_MAX) | bit(BlkFeature.BLK_SIZE)
                | bit(BlkFeature.FLUSH) | bit(BlkFeature.MQ) | bit(BlkFeature.CONFIG_WCE)
                | bit(BlkFeature.DISCARD) | bit(BlkFeature.WRITE_ZEROES))
DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def sessions() -> Iterator[list[Attached]]:
    opened: list[Attached] = []
    yield opened
    for s in opened:
        s.close()


def submit(ring: DriverRing, type_: int, sector: int, data: bytes = b"", read_len: int = 0,
           data_gpa: int | None = None) -> tuple[int, int, int]:
    """Queues a request without waiting: (head, status gpa, data gpa)."""
    ram = ring.ram
    h = ram.alloc(16)
    ram.write(h, struct.pack("<IIQ", type_, 0, sector))
    bufs = [Buf(h, 16)]
    gpa = 0
    if data:
        gpa = data_gpa if data_gpa is not None else ram.alloc(len(data), 512)
        ram.write(gpa, data)
        bufs.append(Buf(gpa, len(data)))
    elif read_len:
        gpa = data_gpa if data_gpa is not None else ram.alloc(read_len, 512)
        bufs.append(Buf(gpa, read_len, writable=True))
    st = ram.alloc(1, 1)
    ram.write(st, b"\xff")
    bufs.append(Buf(st, 1, writable=True))
    head = ring.submit(bufs)
    ring.kick()
    return head, st, gpa


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def io_roundtrip(a: Attached, ring_index: int = 0, sector: int = 8) -> None:
    blk = a.blk(ring_index)
    data = pattern(4096, seed=sector + 100 * ring_index)
    r = blk.write(sector, data)
    assert (r.status, r.used_len) == (VIRTIO_BLK_S_OK, 1)
    r = blk.read(sector, 4096)
    assert (r.status, r.used_len) == (VIRTIO_BLK_S_OK, 4097)
    assert r.data == data


# --- negotiation, config, queue counts -------------------------------------------------

def test_full_negotiation_and_io(daemon: Daemon, sessions: list[Attached]) -> None:
    fe = daemon.connect()
    assert fe.get_u64(Request.GET_FEATURES) == BLK_FEATURES
    offered_proto = fe.get_u64(Request.GET_PROTOCOL_FEATURES)
    assert offered_proto & ALL_PROTOCOL == ALL_PROTOCOL
    assert offered_proto & ~(ALL_PROTOCOL | bit(ProtocolFeature.INFLIGHT_SHMFD)) == 0
    fe.close()
    a = attach(daemon)
    sessions.append(a)
    # The test front-end acks RING_PACKED only when asked (split rings here).
    assert a.features == BLK_FEATURES & ~bit(VirtioFeature.RING_PACKED) and a.protocol_features == offered_proto
    io_roundtrip(a)
    blk = a.blk()
    assert blk.flush().status == VIRTIO_BLK_S_OK
    r = blk.get_id()
    assert (r.status, r.used_len, r.data) == (VIRTIO_BLK_S_OK, 21, b"SER123" + bytes(14))
    r = blk.read(8, 4096, indirect=True)
    assert r.status == VIRTIO_BLK_S_OK and r.data == pattern(4096, seed=8)
    assert blk.read(2048, SECTOR).status == VIRTIO_BLK_S_IOERR   # 1 MiB image: 2048 sectors
    with open(daemon.image, "rb") as f:
        f.seek(8 * SECTOR)
        assert f.read(4096) == pattern(4096, seed=8)


def test_feature_subset_is_what_the_rings_use(daemon: Daemon, sessions: list[Attached]) -> None:
    want = BLK_FEATURES & ~bit(VirtioFeature.RING_INDIRECT_DESC) & ~bit(VirtioFeature.RING_EVENT_IDX) \
        & ~bit(VirtioFeature.RING_PACKED)
    a = attach(daemon, want=want)
    sessions.append(a)
    assert a.features == want
    io_roundtrip(a)
    # No EVENT_IDX: kicks are re-enabled with the flag once the worker goes idle
    # (it may still be finishing its loop right after the completion is visible).
    deadline = time.monotonic() + 2
    while a.ring.used_flags() != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.ring.used_flags() == 0
    # INDIRECT_DESC was not acked: an indirect descriptor breaks the ring.
    a.ring.submit([Buf(a.ram.alloc(16), 16)], indirect=True)
    a.ring.kick()
    assert readable(a.ring.err_fd, 5), "err eventfd not signalled"
    assert a.fe.get_u64(Request.GET_QUEUE_NUM) == 1   # the connection is fine


def test_read_only_device(daemon_factory: DaemonFactory, sessions: list[Attached]) -> None:
    d = daemon_factory(read_only=True)
    a = attach(d)
    sessions.append(a)
    # A read-only disk offers no DISCARD or WRITE_ZEROES (it would refuse them).
    assert a.features == (BLK_FEATURES | bit(BlkFeature.RO)) & ~bit(BlkFeature.DISCARD) & ~bit(BlkFeature.WRITE_ZEROES) \
        & ~bit(VirtioFeature.RING_PACKED)
    blk = a.blk()
    assert blk.write(0, b"x" * SECTOR).status == VIRTIO_BLK_S_IOERR
    r = blk.read(0, SECTOR)
    assert r.status == VIRTIO_BLK_S_OK and r.data == pattern(1 << 20, seed=1)[:SECTOR]
    assert d.image.read_bytes() == pattern(1 << 20, seed=1)


def test_get_config(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(num_queues=3, size=3 << 20)
    fe = d.connect()
    try:
        cfg = fe.get_config(60)
        assert len(cfg) == 60
        capacity, size_max, seg_max = struct.unpack_from("<QII", cfg, 0)
        (blk_size,) = struct.unpack_from("<I", cfg, 20)
        (num_queues,) = struct.unpack_from("<H", cfg, 34)
        assert capacity == (3 << 20) // SECTOR == 6144
        assert size_max == SIZE_MAX == 1 << 20
        assert seg_max == SEG_MAX == 510
        assert blk_size == 512
        assert num_queues == 3
        assert cfg[16:20] == bytes(4) and cfg[24:32] == bytes(8) and cfg[33] == 0
        assert cfg[32] == 1                          # writeback: the write cache is on
        # max_discard_sectors, max_discard_seg, discard_sector_alignment,
        # max_write_zeroes_sectors, max_write_zeroes_seg, write_zeroes_may_unmap
        trim = struct.unpack_from("<IIIIIB", cfg, 36)
        assert trim[0] == trim[3] == 0x3FFFFF and trim[1] == trim[4] == 32 and trim[2] >= 1 and trim[5] == 1
        assert cfg[57:] == bytes(3)
        assert fe.get_config(2, offset=34) == struct.pack("<H", 3)
        assert fe.get_config(8, offset=0) == struct.pack("<Q", 6144)
        assert fe.get_config(16, offset=200) == bytes(16)
        assert fe.get_config(256) == cfg + bytes(196)
        # The reply echoes offset, size and flags.
        raw = fe.call(Request.GET_CONFIG, Config(20, 4, 0, bytes(4)).pack())
        assert Config.unpack(raw) == Config(20, 4, 0, struct.pack("<I", 512))
    finally:
        fe.close()


def test_get_queue_num_and_max_mem_slots(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(num_queues=4)
    fe = d.connect()
    try:
        assert fe.get_u64(Request.GET_QUEUE_NUM) == 4
        assert fe.get_u64(Request.GET_MAX_MEM_SLOTS) == 509
    finally:
        fe.close()


# --- REPLY_ACK --------------------------------------------------------------------------

def test_reply_ack(daemon: Daemon) -> None:
    fe = daemon.connect()
    ram = GuestRam([1 << 20])
    ring = DriverRing(ram, 0, 64)
    try:
        offered = fe.get_u64(Request.GET_FEATURES)
        fe.send(Request.SET_PROTOCOL_FEATURES, U64(ALL_PROTOCOL).pack())
        assert fe.call_ack(Request.SET_OWNER) == 0
        split = offered & ~bit(VirtioFeature.RING_PACKED)     # a DriverRing is split
        assert fe.call_ack(Request.SET_FEATURES, U64(split).pack()) == 0
        assert fe.call_ack(Request.SET_MEM_TABLE, ram.mem_table().pack(), ram.fds()) == 0
        assert fe.call_ack(Request.SET_VRING_NUM, VringState(0, 64).pack()) == 0
        assert fe.call_ack(Request.SET_VRING_BASE, VringState(0, 0).pack()) == 0
        assert fe.call_ack(Request.SET_VRING_ADDR, VringAddr(
            0, 0, ram.gpa_to_uva(ring.desc), ram.gpa_to_uva(ring.used), ram.gpa_to_uva(ring.avail), 0).pack()) == 0
        assert fe.call_ack(Request.SET_VRING_CALL, U64(0).pack(), [ring.call_fd]) == 0
        assert fe.call_ack(Request.SET_VRING_ERR, U64(0).pack(), [ring.err_fd]) == 0
        assert fe.call_ack(Request.SET_VRING_KICK, U64(0).pack(), [ring.kick_fd]) == 0
        assert fe.call_ack(Request.SET_VRING_ENABLE, VringState(0, 1).pack()) == 0
        # SET_CONFIG is refused by the device: a nonzero ack, the connection stays.
        assert fe.call_ack(Request.SET_CONFIG, Config(0, 8, 0, bytes(8)).pack()) != 0
        daemon.wait_log("VHOST_USER_SET_CONFIG failed")
        # Requests with a reply get that reply only, never an extra ack.
        fe.send(Request.GET_FEATURES, need_reply=True)
        assert U64.unpack(fe.recv_reply(Request.GET_FEATURES)).value == offered
        assert fe.get_u64(Request.GET_QUEUE_NUM) == 1
        r = BlkDriver(ring).read(0, SECTOR)
        assert r.status == VIRTIO_BLK_S_OK
        assert not fe.is_closed(0.1)
    finally:
        fe.close()
        ring.close()
        ram.close()


def test_no_acks_without_reply_ack(daemon: Daemon) -> None:
    fe = daemon.connect()
    try:
        fe.get_u64(Request.GET_FEATURES)
        fe.send(Request.SET_PROTOCOL_FEATURES, U64(bit(ProtocolFeature.MQ)).pack())
        fe.send(Request.SET_OWNER, need_reply=True)
        fe.send(Request.SET_CONFIG, Config(0, 4, 0, bytes(4)).pack(), need_reply=True)
        # The next thing on the socket is GET_QUEUE_NUM's reply, not an ack.
        assert fe.get_u64(Request.GET_QUEUE_NUM) == 1
        assert not fe.is_closed(0.1)
    finally:
        fe.close()


# --- ring lifecycle -------------------------------------------------------------------------

def test_kick_while_disabled_is_served_on_enable(daemon: Daemon, sessions: list[Attached]) -> None:
    a = attach(daemon, enable=False)
    sessions.append(a)
    head, st, gpa = submit(a.ring, VIRTIO_BLK_T_IN, 4, read_len=SECTOR)
    with pytest.raises(TimeoutError):
        a.ring.wait_used(1, timeout=0.3)
    assert a.ram.read(st, 1) == b"\xff"
    a.fe.send(Request.SET_VRING_ENABLE, VringState(0, 1).pack())
    assert a.ring.wait_used(1) == [(head, SECTOR + 1)]
    assert a.ram.read(st, 1) == bytes([VIRTIO_BLK_S_OK])
    assert a.ram.read(gpa, SECTOR) == pattern(1 << 20, seed=1)[4 * SECTOR: 5 * SECTOR]


def test_disable_stops_the_ring(daemon: Daemon, sessions: list[Attached]) -> None:
    a = attach(daemon)
    sessions.append(a)
    io_roundtrip(a)
    assert a.fe.call_ack(Request.SET_VRING_ENABLE, VringState(0, 0).pack()) == 0
    head, _, _ = submit(a.ring, VIRTIO_BLK_T_IN, 0, read_len=SECTOR)
    with pytest.raises(TimeoutError):
        a.ring.wait_used(1, timeout=0.3)
    a.fe.send(Request.SET_VRING_ENABLE, VringState(0, 1).pack())
    assert a.ring.wait_used(1) == [(head, SECTOR + 1)]


def test_rings_start_enabled_without_protocol_features(daemon: Daemon, sessions: list[Attached]) -> None:
    want = BLK_FEATURES & ~bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
    a = attach(daemon, want=want)      # start_ring() sends no SET_VRING_ENABLE
    sessions.append(a)
    assert not a.features & bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
    io_roundtrip(a)


def test_get_vring_base_stops_the_ring(daemon: Daemon, sessions: list[Attached]) -> None:
    a = attach(daemon)
    sessions.append(a)
    blk = a.blk()
    for i in range(3):
        assert blk.flush().status == VIRTIO_BLK_S_OK
    assert a.fe.get_vring_base(0) == 3
    head, st, _ = submit(a.ring, VIRTIO_BLK_T_OUT, 0, data=b"s" * SECTOR)
    with pytest.raises(TimeoutError):
        a.ring.wait_used(1, timeout=0.3)
    assert a.ram.read(st, 1) == b"\xff"
    assert a.fe.get_vring_base(0) == 3      # still stopped, still at 3
    # Restart from where it stopped: the pending request is served.
    a.fe.send(Request.SET_VRING_BASE, VringState(0, 3).pack())
    a.fe.send(Request.SET_VRING_KICK, U64(0).pack(), [a.ring.kick_fd])
    assert a.ring.wait_used(1) == [(head, 1)]
    assert a.ring.used_idx() == 4
    assert a.fe.get_vring_base(0) == 4
    assert daemon.image.read_bytes()[:SECTOR] == b"s" * SECTOR


def test_restart_at_a_different_base(daemon: Daemon, sessions: list[Attached]) -> None:
    """SET_VRING_BASE is where the back-end resumes popping (e.g. after migration)."""
    a = attach(daemon, enable=False)
    sessions.append(a)
    assert a.fe.get_vring_base(0) == 0
    a.ring.avail_idx = 10              # the driver's avail idx is already 10
    a.ring.set_avail_idx(10)
    a.fe.send(Request.SET_VRING_BASE, VringState(0, 10).pack())
    a.fe.send(Request.SET_VRING_KICK, U64(0).pack(), [a.ring.kick_fd])
    a.fe.send(Request.SET_VRING_ENABLE, VringState(0, 1).pack())
    head, _, _ = submit(a.ring, VIRTIO_BLK_T_IN, 1, read_len=SECTOR)
    assert a.ring.wait_used(1) == [(head, SECTOR + 1)]
    assert a.fe.get_vring_base(0) == 11


def test_two_queues(daemon_factory: DaemonFactory, sessions: list[Attached]) -> None:
    d = daemon_factory(num_queues=2)
    a = attach(d, queues=2)
    sessions.append(a)
    io_roundtrip(a, 0, sector=16)
    io_roundtrip(a, 1, sector=32)
    # Both in flight at once.
    h0, _, g0 = submit(a.rings[0], VIRTIO_BLK_T_IN, 32, read_len=4096)
    h1, _, g1 = submit(a.rings[1], VIRTIO_BLK_T_IN, 16, read_len=4096)
    assert a.rings[0].wait_used(1) == [(h0, 4097)]
    assert a.rings[1].wait_used(1) == [(h1, 4097)]
    assert a.ram.read(g0, 4096) == pattern(4096, seed=32 + 100)
    assert a.ram.read(g1, 4096) == pattern(4096, seed=16)
    assert a.fe.get_vring_base(0) == 3 and a.fe.get_vring_base(1) == 3


def test_ring_index_beyond_queue_count_closes(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(num_queues=2)
    fe = d.connect()
    fe.send(Request.SET_VRING_NUM, VringState(2, 64).pack())
    assert fe.is_closed()
    fe.close()
    assert any("VHOST_USER_SET_VRING_NUM: ring index 2 out of range" in ln for ln in d.lines("ERROR"))


def test_polled_ring_without_kick_fd(daemon: Daemon, sessions: list[Attached]) -> None:
    a = attach(daemon, enable=False)
    sessions.append(a)
    a.fe.send(Request.SET_VRING_KICK, U64(VRING_NOFD_MASK).pack())
    a.fe.send(Request.SET_VRING_ENABLE, VringState(0, 1).pack())
    head, st, _ = submit(a.ring, VIRTIO_BLK_T_IN, 0, read_len=SECTOR)
    os.eventfd_read(a.ring.kick_fd)      # the kick went nowhere: take it back
    assert a.ring.wait_used(1) == [(head, SECTOR + 1)]


def test_broken_ring_signals_err_fd_and_can_be_restarted(daemon: Daemon, sessions: list[Attached]) -> None:
    a = attach(daemon)
    sessions.append(a)
    a.ring.push_avail(999)
    a.ring.kick()
    assert readable(a.ring.err_fd, 5)
    assert a.ring.errors() == 1
    assert a.fe.get_vring_base(0) == 0            # the bad entry was not consumed
    # The driver repairs the entry and restarts the ring.
    a.ring.avail_idx = 0
    head, st, _ = submit(a.ring, VIRTIO_BLK_T_IN, 0, read_len=SECTOR)
    a.fe.send(Request.SET_VRING_BASE, VringState(0, 0).pack())
    a.fe.send(Request.SET_VRING_KICK, U64(0).pack(), [a.ring.kick_fd])
    assert a.ring.wait_used(1) == [(head, SECTOR + 1)]
    assert a.ring.errors() == 0


# --- memory table swaps --------------------------------------------------------------------

def test_set_mem_table_while_rings_run(daemon: Daemon, sessions: list[Attached]) -> None:
    a = attach(daemon)
    sessions.append(a)
    io_roundtrip(a)
    extra = GuestRam([1 << 16], base=a.ram.end + (1 << 20))
    try:
        both = MemTable(a.ram.mem_table().regions + extra.mem_table().regions)
        assert a.fe.call_ack(Request.SET_MEM_TABLE, both.pack(), a.ram.fds() + extra.fds()) == 0
        io_roundtrip(a, sector=40)
        # A buffer in the new region works...
        gpa = extra.regions[0].gpa
        head, _, _ = submit(a.ring, VIRTIO_BLK_T_IN, 40, read_len=4096, data_gpa=gpa)
        assert a.ring.wait_used(1) == [(head, 4097)]
        assert extra.read(gpa, 4096) == pattern(4096, seed=40)
        # ...and stops working once the table no longer has it.
        assert a.fe.call_ack(Request.SET_MEM_TABLE, a.ram.mem_table().pack(), a.ram.fds()) == 0
        io_roundtrip(a, sector=48)
        submit(a.ring, VIRTIO_BLK_T_IN, 0, read_len=SECTOR, data_gpa=gpa)
        assert readable(a.ring.err_fd, 5)
        assert a.fe.get_vring_base(0) == 7
    finally:
        extra.close()


# --- malformed messages: the connection closes, the daemon goes on ---------------------------

def hdr(request: int, size: int, flags: int = V) -> bytes:
    return struct.pack("<III", request, flags, size)


def send_raw(fe: Frontend, request: int, payload: bytes = b"", flags: int = V,
             fds: list[int] | None = None, size: int | None = None) -> None:
    fe.send_raw(hdr(request, len(payload) if size is None else size, flags) + payload, fds)


class Ctx:
    """Resources a malformed-message case may need; closed afterwards."""

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe
        self.fds: list[int] = []
        self.rams: list[GuestRam] = []
        self.rings: list[DriverRing] = []

    def memfd(self, size: int = 1 << 16) -> int:
        fd = os.memfd_create("vhostd-test", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self.fds.append(fd)
        return fd

    def ready(self, protocol_features: bool = True) -> tuple[GuestRam, DriverRing]:
        """Negotiated, with a memory table and a configured (not started) ring."""
        want = ~0 if protocol_features else ~bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
        self.fe.negotiate(want, ~0)
        ram = GuestRam([1 << 20])
        self.rams.append(ram)
        self.fe.set_mem_table(ram)
        ring = DriverRing(ram, 0, 64)
        self.rings.append(ring)
        return ram, ring

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        for r in self.rings:
            r.close()
        for m in self.rams:
            m.close()


def table(regions: list[tuple[int, int, int, int]], claimed: int | None = None) -> bytes:
    n = len(regions) if claimed is None else claimed
    return struct.pack("<II", n, 0) + b"".join(MemRegion(*r).pack() for r in regions)


def regions(n: int) -> list[tuple[int, int, int, int]]:
    return [(0x10_0000 * (i + 1), 1 << 16, 0x7000_0000_0000 + 0x10_0000 * i, 0) for i in range(n)]


def bad_vring_addr(c: Ctx) -> None:
    ram, ring = c.ready()
    c.fe.send(Request.SET_VRING_NUM, VringState(0, 64).pack())
    c.fe.send(Request.SET_VRING_ADDR, VringAddr(0, 0, 0x1000, 0x2000, 0x3000, 0).pack())
    c.fe.send(Request.SET_VRING_KICK, U64(0).pack(), [ring.kick_fd])
    c.fe.send(Request.SET_VRING_ENABLE, VringState(0, 1).pack())   # the ring starts here


def unpollable_kick_fd(c: Ctx) -> None:
    ram, ring = c.ready()
    c.fe.send(Request.SET_VRING_NUM, VringState(0, 64).pack())
    c.fe.send(Request.SET_VRING_ADDR, VringAddr(0, 0, ram.gpa_to_uva(ring.desc), ram.gpa_to_uva(ring.used),
                                                ram.gpa_to_uva(ring.avail), 0).pack())
    c.fe.send(Request.SET_VRING_KICK, U64(0).pack(), [c.memfd()])    # epoll refuses regular files
    c.fe.send(Request.SET_VRING_ENABLE, VringState(0, 1).pack())


def short_memfd_ring(c: Ctx) -> None:
    """A region claiming 1 MiB of a 4 KiB memfd: mapping it would let the
    ring setup (or a worker) fault with SIGBUS."""
    c.fe.negotiate(~0, ~0)
    ram = GuestRam([1 << 20])
    c.rams.append(ram)
    ram.alloc(8192)
    ring = DriverRing(ram, 0, 64)
    c.rings.append(ring)
    os.ftruncate(ram.fds()[0], 4096)
    c.fe.send(Request.SET_MEM_TABLE, ram.mem_table().pack(), ram.fds())


def truncated_payload(c: Ctx) -> None:
    c.fe.send_raw(hdr(Request.SET_FEATURES, 8) + bytes(4))
    c.fe.sock.shutdown(socket.SHUT_WR)   # the daemon sees EOF inside the payload


def log_base_past_fd_end(c: Ctx) -> None:
    c.fe.negotiate(~0, ~0)
    c.fe.send(Request.SET_LOG_BASE, LogBase(1 << 17, 0).pack(), fds=[c.memfd(1 << 16)])


def log_base_zero_size(c: Ctx) -> None:
    c.fe.negotiate(~0, ~0)
    c.fe.send(Request.SET_LOG_BASE, LogBase(0, 0).pack(), fds=[c.memfd()])


MALFORMED: list[tuple[str, str, Callable[[Ctx], None]]] = [
    ("unknown_request", "request 99: unknown request", lambda c: send_raw(c.fe, 99)),
    ("bad_version", "VHOST_USER_GET_FEATURES: unsupported version in flags 0x2",
     lambda c: send_raw(c.fe, Request.GET_FEATURES, flags=2)),
    ("reply_flag", "VHOST_USER_GET_FEATURES: reply flag set on a request",
     lambda c: send_raw(c.fe, Request.GET_FEATURES, flags=V | 4)),
    ("unsupported_set_vring_endian", "VHOST_USER_SET_VRING_ENDIAN: request not supported",
     lambda c: send_raw(c.fe, Request.SET_VRING_ENDIAN, bytes(8))),
    ("log_base_wrong_size", "VHOST_USER_SET_LOG_BASE: payload size 8 is invalid",
     lambda c: send_raw(c.fe, Request.SET_LOG_BASE, bytes(8), fds=[c.memfd()])),
    ("log_base_without_fd", "VHOST_USER_SET_LOG_BASE: carries 0 fds, expected 1",
     lambda c: send_raw(c.fe, Request.SET_LOG_BASE, LogBase(4096, 0).pack())),
    ("log_base_not_negotiated", "VHOST_USER_SET_LOG_BASE: LOG_SHMFD was not negotiated",
     lambda c: send_raw(c.fe, Request.SET_LOG_BASE, LogBase(4096, 0).pack(), fds=[c.memfd()])),
    ("log_base_past_fd_end", "VHOST_USER_SET_LOG_BASE: dirty log: cannot map 131072 bytes at offset 0: "
     "past the end of the file", log_base_past_fd_end),
    ("log_base_zero_size", "VHOST_USER_SET_LOG_BASE: log of 0 bytes", log_base_zero_size),
    ("wrong_size", "VHOST_USER_SET_FEATURES: payload size 4 is invalid",
     lambda c: send_raw(c.fe, Request.SET_FEATURES, bytes(4))),
    ("oversized_payload", "VHOST_USER_SET_FEATURES: payload size 5000 > 4096",
     lambda c: send_raw(c.fe, Request.SET_FEATURES, size=5000)),
    ("truncated_payload", "VHOST_USER_SET_FEATURES: connection closed inside a message payload",
     truncated_payload),
    ("mem_table_9_regions", "VHOST_USER_SET_MEM_TABLE: 9 memory regions, at most 8",
     lambda c: send_raw(c.fe, Request.SET_MEM_TABLE, table(regions(8), claimed=9),
                        fds=[c.memfd() for _ in range(8)])),
    ("mem_table_size_mismatch", "VHOST_USER_SET_MEM_TABLE: payload of 72 bytes for 1 regions",
     lambda c: send_raw(c.fe, Request.SET_MEM_TABLE, table(regions(2), claimed=1), fds=[c.memfd()])),
    ("mem_table_fewer_fds", "VHOST_USER_SET_MEM_TABLE: carries 1 fds, expected 2",
     lambda c: send_raw(c.fe, Request.SET_MEM_TABLE, table(regions(2)), fds=[c.memfd()])),
    ("mem_table_more_fds", "VHOST_USER_SET_MEM_TABLE: carries 3 fds, expected 2",
     lambda c: send_raw(c.fe, Request.SET_MEM_TABLE, table(regions(2)), fds=[c.memfd() for _ in range(3)])),
    ("mem_table_too_many_fds", "VHOST_USER_SET_MEM_TABLE: too many fds attached",
     lambda c: send_raw(c.fe, Request.SET_MEM_TABLE, table(regions(8)), fds=[c.memfd() for _ in range(12)])),
    ("mem_table_overlap", "VHOST_USER_SET_MEM_TABLE: region (gpa 0x100000 size 0x10000 uva 0x710000000000 "
     "offset 0x0) overlaps region (gpa 0x100000 size 0x10000 uva 0x700000000000 offset 0x0) in guest-physical",
     lambda c: send_raw(c.fe, Request.SET_MEM_TABLE,
                        table([(0x10_0000, 1 << 16, 0x7000_0000_0000, 0), (0x10_0000, 1 << 16, 0x7100_0000_0000, 0)]),
                        fds=[c.memfd(), c.memfd()])),
    ("mem_table_zero_size", "VHOST_USER_SET_MEM_TABLE: region 0 (gpa 0x100000 size 0x0",
     lambda c: send_raw(c.fe, Request.SET_MEM_TABLE, table([(0x10_0000, 0, 0x7000_0000_0000, 0)]),
                        fds=[c.memfd()])),
    ("mem_table_unmappable_fd", "VHOST_USER_SET_MEM_TABLE: region 0",
     lambda c: send_raw(c.fe, Request.SET_MEM_TABLE, table(regions(1)), fds=[c.fe.sock.fileno()])),
    ("mem_table_region_past_memfd_end", "VHOST_USER_SET_MEM_TABLE: region 0", short_memfd_ring),
    ("kick_nofd_bit_and_fd", "VHOST_USER_SET_VRING_KICK: carries 1 fds, expected 0",
     lambda c: send_raw(c.fe, Request.SET_VRING_KICK, U64(VRING_NOFD_MASK).pack(), fds=[c.memfd()])),
    ("kick_without_fd", "VHOST_USER_SET_VRING_KICK: carries 0 fds, expected 1",
     lambda c: send_raw(c.fe, Request.SET_VRING_KICK, U64(0).pack())),
    ("call_reserved_bits", "VHOST_USER_SET_VRING_CALL: reserved bits set in 0x200",
     lambda c: send_raw(c.fe, Request.SET_VRING_CALL, U64(0x200).pack(), fds=[c.memfd()])),
    ("fds_on_get_features", "VHOST_USER_GET_FEATURES: carries 2 fds, expected 0",
     lambda c: send_raw(c.fe, Request.GET_FEATURES, fds=[c.memfd(), c.memfd()])),
    ("config_over_256", "VHOST_USER_GET_CONFIG: config size 257 > 256",
     lambda c: send_raw(c.fe, Request.GET_CONFIG, struct.pack("<III", 0, 257, 0) + bytes(256))),
    ("config_size_mismatch", "VHOST_USER_GET_CONFIG: payload of 20 bytes for 4 config bytes",
     lambda c: send_raw(c.fe, Request.GET_CONFIG, struct.pack("<III", 0, 4, 0) + bytes(8))),
    ("features_not_offered", "VHOST_USER_SET_FEATURES: features 0x8000000000000000 were not offered",
     lambda c: c.fe.send(Request.SET_FEATURES, U64(1 << 63).pack())),
    ("protocol_features_not_offered", "VHOST_USER_SET_PROTOCOL_FEATURES: protocol features 0x4 were not offered",
     lambda c: c.fe.send(Request.SET_PROTOCOL_FEATURES, U64(4).pack())),   # RARP: net only
    ("vring_num_not_power_of_two", "VHOST_USER_SET_VRING_NUM: ring 0: size 100 is not a power of two",
     lambda c: c.fe.send(Request.SET_VRING_NUM, VringState(0, 100).pack())),
    ("vring_num_too_big", "VHOST_USER_SET_VRING_NUM: ring 0: size 65536",
     lambda c: c.fe.send(Request.SET_VRING_NUM, VringState(0, 65536).pack())),
    ("vring_index_out_of_range", "VHOST_USER_SET_VRING_BASE: ring index 1 out of range",
     lambda c: c.fe.send(Request.SET_VRING_BASE, VringState(1, 0).pack())),
    ("vring_base_over_16_bits", "VHOST_USER_SET_VRING_BASE: ring 0: base 65536 does not fit 16 bits",
     lambda c: c.fe.send(Request.SET_VRING_BASE, VringState(0, 65536).pack())),
    ("vring_addr_unknown_flags", "VHOST_USER_SET_VRING_ADDR: ring 0: unknown flags 0x2",
     lambda c: c.fe.send(Request.SET_VRING_ADDR, VringAddr(0, 2, 0, 0, 0, 0).pack())),
    ("vring_addr_outside_memory", "VHOST_USER_SET_VRING_ENABLE: ring 0: size 64, desc 0x1000", bad_vring_addr),
    ("vring_enable_value_2", "VHOST_USER_SET_VRING_ENABLE: ring 0: enable value 2 is not 0 or 1",
     lambda c: c.fe.send(Request.SET_VRING_ENABLE, VringState(0, 2).pack())),
    ("get_vring_base_out_of_range", "VHOST_USER_GET_VRING_BASE: ring index 7 out of range",
     lambda c: c.fe.send(Request.GET_VRING_BASE, VringState(7, 0).pack())),
    ("unpollable_kick_fd", "VHOST_USER_SET_VRING_ENABLE: ring 0", unpollable_kick_fd),
]


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[Daemon]:
    d = Daemon()
    yield d
    alive = d.alive
    rc = d.stop()
    log = d.log()
    d.cleanup()
    assert alive and rc == 0, f"vhostd died (rc {rc}):\n{log}"


@pytest.mark.parametrize("name,expect,action", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_message_closes_the_connection(shared_daemon: Daemon, name: str, expect: str,
                                                 action: Callable[[Ctx], None]) -> None:
    d = shared_daemon
    errors_before = len(d.lines("ERROR"))
    fe = d.connect()
    ctx = Ctx(fe)
    try:
        action(ctx)
        assert fe.is_closed(5), "the daemon kept a connection that sent a malformed message"
    finally:
        fe.close()
        ctx.close()
    assert d.alive, f"vhostd died:\n{d.log()}"
    new = d.lines("ERROR")[errors_before:]
    assert len(new) == 1, f"expected one ERROR line, got {new}"
    assert f"ERROR {d.name}: closing connection: {expect}" in new[0], new[0]
    # The daemon takes the next front-end.
    fe2 = d.connect()
    try:
        assert fe2.get_u64(Request.GET_FEATURES) == BLK_FEATURES
    finally:
        fe2.close()


def test_front_end_leaving_without_reading_replies(shared_daemon: Daemon) -> None:
    """A front-end that sends requests and hangs up without reading the
    replies makes the daemon's send/recv fail (EPIPE, ECONNRESET): only that
    session ends."""
    d = shared_daemon
    lost = d.log().count("WARNING blk0: connection lost")
    for _ in range(5):
        fe = d.connect()
        for _ in range(20):
            fe.send(Request.GET_CONFIG, Config(0, 256, 0, bytes(256)).pack())
        fe.close()     # with replies unread: the daemon gets ECONNRESET or EPIPE
        d.wait_log("WARNING blk0: connection lost", count=lost + 1)
        lost += 1
    assert d.alive, f"vhostd died:\n{d.log()}"
    fe = d.connect()
    try:
        assert fe.get_u64(Request.GET_QUEUE_NUM) == 1
    finally:
        fe.close()


# --- one front-end at a time, reconnects ------------------------------------------------------

def test_second_front_end_is_refused(daemon: Daemon, sessions: list[Attached]) -> None:
    a = attach(daemon)
    sessions.append(a)
    io_roundtrip(a)
    second = Frontend(str(daemon.sock))
    try:
        assert second.is_closed(5)
    finally:
        second.close()
    daemon.wait_log("refusing a second front-end")
    io_roundtrip(a, sector=24)
    assert a.fe.get_u64(Request.GET_QUEUE_NUM) == 1


def test_disconnect_and_reconnect(daemon: Daemon, sessions: list[Attached]) -> None:
    a = attach(daemon)
    data = b"persist!" * 512
    assert a.blk().write(100, data).status == VIRTIO_BLK_S_OK
    a.close()
    daemon.wait_log("front-end disconnected")
    b = attach(daemon)
    sessions.append(b)
    r = b.blk().read(100, len(data))
    assert r.status == VIRTIO_BLK_S_OK and r.data == data
    io_roundtrip(b)
    assert daemon.alive
    assert daemon.log().count("front-end connected") >= 2
