"""VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS: guest memory that grows and
shrinks one region at a time (ADD_MEM_REG / REM_MEM_REG), as QEMU sends it
for DIMM and virtio-mem hotplug once the feature is negotiated.

Unit level: the table (``GuestMemory``) against a model, over many regions.
Session level: a real ``vhostd blk`` and the Python front-end: I/O through
regions added while the ring runs, removal, every rejection path, and no
fd or mapping left behind after many cycles.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhd_helpers import Daemon, fd_is_closed, pattern
from vhostd.fds import OwnedFd
from vhostd.frontend import BlkDriver, DriverRing, Frontend, GuestRam, RamRegion, VIRTIO_BLK_S_OK
from vhostd.memory import GuestMemory, GuestMemoryError
from vhostd.native import MAX_MEM_SLOTS
from vhostd.protocol.constants import ProtocolFeature, Request, bit
from vhostd.protocol.messages import MemRegion, MemRegMsg

PAGE = 4096
DaemonFactory = Callable[..., Daemon]


def memfd(size: int) -> int:
    fd = os.memfd_create("vhostd-test-slots", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def mapped_slots() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "vhostd-test-slots" in line)


# --- the table, against a model ------------------------------------------------

BASE = 0x1_0000_0000
SLOTS = 600


def slot_gpa(slot: int) -> int:
    return BASE + slot * 2 * PAGE       # 8 KiB regions: neighbouring slots are adjacent


class Model:
    """Regions added and not removed, each naming itself in its first bytes."""

    def __init__(self) -> None:
        self.mem = GuestMemory(())
        self.regions: dict[int, tuple[int, int]] = {}     # gpa -> (size, uva)

    def add(self, gpa: int, size: int, uva: int) -> None:
        fd = memfd(size)
        os.pwrite(fd, gpa.to_bytes(8, "little"), 0)
        new, _ = self.mem.with_region(MemRegion(gpa, size, uva, 0), OwnedFd(fd))
        self.mem.close()
        self.mem = new
        self.regions[gpa] = (size, uva)

    def remove(self, gpa: int) -> None:
        size, uva = self.regions.pop(gpa)
        new, gone = self.mem.without(MemRegion(gpa, size, uva, 0xdead))   # the offset is ignored
        self.mem.close()
        self.mem = new
        gone.unmap()

    def check(self) -> None:
        t = self.mem.table
        assert len(t) == len(self.regions)
        for gpa, (size, uva) in self.regions.items():
            h = t.gpa_to_hva(gpa, 8)
            assert h is not None and int.from_bytes(peek(h, 8), "little") == gpa
            assert t.gpa_to_hva(gpa + size - 1, 1) is not None
            assert t.uva_to_hva(uva, size) == t.gpa_to_hva(gpa, size)
            # A range past the region's end translates in one piece only if it ends there.
            assert t.gpa_to_hva(gpa + size - 1, 2) is None

    def check_absent(self, gpas: list[int]) -> None:
        for gpa in gpas:
            if gpa not in self.regions:
                assert self.mem.table.gpa_to_hva(gpa + 100, 1) is None

    def close(self) -> None:
        self.mem.close()
        self.mem.unmap()


def peek(addr: int, n: int) -> bytes:
    import ctypes
    return ctypes.string_at(addr, n)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, SLOTS - 1)), min_size=1, max_size=200))
def test_add_and_remove_against_a_model(ops: list[tuple[bool, int]]) -> None:
    """Whatever was added and not removed translates (neighbours adjacent,
    gaps where slots are empty), nothing else does; a region half over
    another is refused and its fd closed."""
    m = Model()
    try:
        for add, slot in ops:
            gpa = slot_gpa(slot)
            if add and gpa not in m.regions:
                m.add(gpa, 2 * PAGE, 0x7f00_0000_0000 + gpa)
            elif add:
                fd = memfd(2 * PAGE)
                with pytest.raises(GuestMemoryError, match="overlaps"):
                    m.mem.with_region(MemRegion(gpa + PAGE, 2 * PAGE, 0x7e00_0000_0000 + gpa, 0), OwnedFd(fd))
                assert fd_is_closed(fd)
            elif gpa in m.regions:
                m.remove(gpa)
        m.check()
        m.check_absent([slot_gpa(i) for i in range(SLOTS)])
    finally:
        m.close()
    assert mapped_slots() == 0


def test_509_regions_translate_and_one_more_is_refused() -> None:
    m = Model()
    try:
        for i in range(MAX_MEM_SLOTS):
            m.add(0x1_0000_0000 + i * 3 * PAGE, PAGE, 0x7f00_0000_0000 + i * 3 * PAGE)
        m.check()
        assert len(m.mem.table) == 509
        fd = memfd(PAGE)
        with pytest.raises(GuestMemoryError, match="all 509 memory slots are in use"):
            m.mem.with_region(MemRegion(0x10, PAGE, 0x10, 0), OwnedFd(fd))
        assert fd_is_closed(fd)
    finally:
        m.close()
    assert mapped_slots() == 0


def test_a_region_spanning_lookup_splits_across_adjacent_slots() -> None:
    m = Model()
    try:
        for i in range(8):
            m.add(0x10_0000 + i * PAGE, PAGE, 0x7000_0000 + i * 2 * PAGE)   # adjacent in gpa only
        iov = m.mem.table.gpa_to_iov(0x10_0000 + PAGE - 8, 3 * PAGE, max_iov=8)
        assert [n for _, n in iov] == [8, PAGE, PAGE, PAGE - 8]
    finally:
        m.close()


# --- a real daemon --------------------------------------------------------------

SLOT = 64 * 1024


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    r = GuestRam([SLOT] * 40)
    yield r
    r.close()


def connect(d: Daemon, *, slots: bool = True) -> Frontend:
    fe = d.connect()
    want = bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS) * slots
    _, proto = fe.negotiate(~0, want | bit(ProtocolFeature.MQ))
    assert bool(proto & bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)) == slots
    return fe


def start_io(fe: Frontend, ram: GuestRam, regions: int) -> BlkDriver:
    """ADD_MEM_REG for the first regions, then a ring in them."""
    for r in ram.regions[:regions]:
        assert fe.add_mem_reg(r) == 0
    ring = DriverRing(ram, 0, 16)
    fe.start_ring(ring)
    return BlkDriver(ring)


def test_memory_grows_region_by_region_under_io(daemon_factory: DaemonFactory, ram: GuestRam) -> None:
    """Like QEMU once CONFIGURE_MEM_SLOTS is negotiated: even the first
    table comes as ADD_MEM_REG.  The ring runs in the first two regions;
    each new region carries requests right after its ADD is acknowledged."""
    d = daemon_factory(size=4 << 20)
    fe = connect(d)
    try:
        assert fe.get_u64(Request.GET_MAX_MEM_SLOTS) == 509
        blk = start_io(fe, ram, 2)
        data = pattern(4 << 20, seed=1)
        for i, r in enumerate(ram.regions[2:], start=2):
            assert fe.add_mem_reg(r) == 0
            ram._next = r.gpa - 512              # this request straddles regions i-1 and i
            got = blk.read(i * 8, 4096)
            assert got.status == VIRTIO_BLK_S_OK and got.data == data[i * 8 * 512: i * 8 * 512 + 4096]
            ram._next = r.gpa + 1024
            assert blk.write(i, bytes([i]) * 512).status == VIRTIO_BLK_S_OK
        d.wait_log("blk0: memory: 40 regions")
        assert d.image.read_bytes()[39 * 512: 40 * 512] == bytes([39]) * 512
        assert d.alive
    finally:
        fe.close()


def test_a_removed_region_is_unmapped_and_can_come_back(daemon_factory: DaemonFactory,
                                                         ram: GuestRam) -> None:
    d = daemon_factory()
    fe = connect(d)
    try:
        blk = start_io(fe, ram, 4)
        d.wait_log("blk0: memory: 4 regions")
        maps = d.memfd_maps()
        assert fe.rem_mem_reg(ram.regions[3]) == 0
        d.wait_log("blk0: memory: 3 regions", count=2)     # applied (once more requests settled)
        assert d.memfd_maps() == maps - 1            # unmapped once the rings let go
        assert blk.read(0, 512).status == VIRTIO_BLK_S_OK   # the ring lives in region 0
        assert fe.add_mem_reg(ram.regions[3]) == 0
        ram._next = ram.regions[3].gpa
        assert blk.read(8, 4096).status == VIRTIO_BLK_S_OK
        d.wait_log("blk0: memory: 4 regions", count=2)
    finally:
        fe.close()


def test_the_rings_region_removed_and_added_back_keeps_the_ring(daemon_factory: DaemonFactory,
                                                                ram: GuestRam) -> None:
    """QEMU re-sends a region that changed shape as REM then ADD: a ring
    inside it waits for it instead of failing, and resumes where it was."""
    d = daemon_factory()
    fe = connect(d)
    try:
        blk = start_io(fe, ram, 2)
        assert blk.read(0, 512).status == VIRTIO_BLK_S_OK
        assert fe.rem_mem_reg(ram.regions[0]) == 0
        assert fe.add_mem_reg(ram.regions[0]) == 0
        for i in range(3):
            assert blk.read(i, 512).status == VIRTIO_BLK_S_OK
        assert "closing connection" not in d.log()
    finally:
        fe.close()


def test_the_same_region_added_twice_goes_with_its_last_removal(daemon_factory: DaemonFactory,
                                                               ram: GuestRam) -> None:
    """QEMU's vhost-user-net sends each region once per queue pair on one
    connection: identical ADDs are counted, not refused."""
    d = daemon_factory()
    fe = connect(d)
    try:
        for r in ram.regions[:3]:
            assert fe.add_mem_reg(r) == 0          # the second queue pair's copy (start_io: the first)
        blk = start_io(fe, ram, 3)
        assert fe.rem_mem_reg(ram.regions[2]) == 0
        ram._next = ram.regions[2].gpa
        assert blk.read(0, 4096).status == VIRTIO_BLK_S_OK     # still mapped: one holder left
        assert "memory region removed" not in d.log()
        assert fe.rem_mem_reg(ram.regions[2]) == 0
        d.wait_log("blk0: memory region removed")
        assert "closing connection" not in d.log()
    finally:
        fe.close()


def send_reg(fe: Frontend, request: Request, region: MemRegion, fds: list[int]) -> None:
    fe.send(request, MemRegMsg(region).pack(), fds)


# Each action gets the region already added and a spare one.
Action = Callable[[Frontend, RamRegion, RamRegion], None]
REJECTED: list[tuple[str, str, Action | None]] = [
    ("add_without_fd", "VHOST_USER_ADD_MEM_REG: carries 0 fds, expected 1",
     lambda fe, a, r: send_reg(fe, Request.ADD_MEM_REG, MemRegion(0x4000_0000, SLOT, 0x7e00_0000, 0), [])),
    ("add_zero_size", "VHOST_USER_ADD_MEM_REG: region (gpa 0x40000000 size 0x0 uva 0x7e000000 offset 0x0): size 0",
     lambda fe, a, r: send_reg(fe, Request.ADD_MEM_REG, MemRegion(0x4000_0000, 0, 0x7e00_0000, 0), [r.fd])),
    ("add_wrapping", "VHOST_USER_ADD_MEM_REG: region (gpa 0xffffffffffff0000 size 0x20000",
     lambda fe, a, r: send_reg(fe, Request.ADD_MEM_REG, MemRegion(2**64 - SLOT, 2 * SLOT, 0x7e00_0000, 0),
                               [r.fd])),
    ("add_past_fd_end", "VHOST_USER_ADD_MEM_REG: region (gpa 0x40000000 size 0x10000 uva 0x7e000000 "
     "offset 0x10000): cannot map 0x10000 bytes at offset 0x10000: past the end of the file",
     lambda fe, a, r: send_reg(fe, Request.ADD_MEM_REG, MemRegion(0x4000_0000, SLOT, 0x7e00_0000, SLOT),
                               [r.fd])),
    ("add_gpa_overlap", "in guest-physical space",
     lambda fe, a, r: send_reg(fe, Request.ADD_MEM_REG, MemRegion(a.gpa + 4096, SLOT, 0x7e00_0000, 0), [r.fd])),
    ("add_uva_overlap", "in the front-end's address space",
     lambda fe, a, r: send_reg(fe, Request.ADD_MEM_REG, MemRegion(0x4000_0000, SLOT, a.uva + 4096, 0), [r.fd])),
    ("add_not_negotiated", "VHOST_USER_ADD_MEM_REG: CONFIGURE_MEM_SLOTS was not negotiated", None),
    ("rem_with_two_fds", "VHOST_USER_REM_MEM_REG: carries 2 fds, expected 0",
     lambda fe, a, r: send_reg(fe, Request.REM_MEM_REG, MemRegion(a.gpa, SLOT, a.uva, 0), [r.fd, r.fd])),
]


@pytest.mark.parametrize("name,expect,action", REJECTED, ids=[x[0] for x in REJECTED])
def test_bad_region_messages_close_the_connection(daemon_factory: DaemonFactory, ram: GuestRam, name: str,
                                                  expect: str, action: Action | None) -> None:
    d = daemon_factory()
    idle_fds = d.fd_count()
    fe = connect(d, slots=name != "add_not_negotiated")
    try:
        added = ram.regions[0]
        if action is None:
            fe.send(Request.ADD_MEM_REG, MemRegMsg(MemRegion(added.gpa, SLOT, added.uva, 0)).pack(), [added.fd])
        else:
            assert fe.add_mem_reg(added) == 0
            action(fe, added, ram.regions[1])
        assert fe.is_closed(), f"{name}: connection kept"
        d.wait_log(expect)
        lines = [ln for ln in d.log().splitlines() if "closing connection" in ln]
        assert len(lines) == 1 and "blk0:" in lines[0], lines
        deadline = time.monotonic() + 5
        while (d.fd_count(), d.memfd_maps()) != (idle_fds, 0):   # nothing of the session is left
            assert time.monotonic() < deadline, f"{d.fd_count()} fds (idle {idle_fds}), {d.memfd_maps()} maps"
            time.sleep(0.02)
        fe2 = connect(d)
        assert fe2.get_u64(Request.GET_MAX_MEM_SLOTS) == 509      # the next front-end is served
        fe2.close()
    finally:
        fe.close()


def test_removing_a_region_that_is_not_there_fails_the_request_only(daemon_factory: DaemonFactory,
                                                                    ram: GuestRam) -> None:
    d = daemon_factory()
    fe = connect(d)
    try:
        assert fe.add_mem_reg(ram.regions[0]) == 0
        assert fe.rem_mem_reg(ram.regions[1]) == 1        # REPLY_ACK failure
        d.wait_log("VHOST_USER_REM_MEM_REG failed: no region with gpa")
        assert fe.rem_mem_reg(ram.regions[0]) == 0        # the connection goes on
        assert fe.get_u64(Request.GET_MAX_MEM_SLOTS) == 509
    finally:
        fe.close()


def test_one_thousand_add_remove_cycles_leak_nothing(daemon_factory: DaemonFactory, ram: GuestRam) -> None:
    d = daemon_factory()
    fe = connect(d)
    try:
        blk = start_io(fe, ram, 2)
        assert fe.add_mem_reg(ram.regions[2]) == 0 and fe.rem_mem_reg(ram.regions[2]) == 0
        assert blk.read(0, 512).status == VIRTIO_BLK_S_OK    # warmed up (the event loop's threads)
        fds, maps = d.fd_count(), d.memfd_maps()
        for i in range(1000):
            r = ram.regions[2 + i % 30]
            assert fe.add_mem_reg(r) == 0
            assert fe.rem_mem_reg(r) == 0
            if i % 100 == 0:
                assert blk.read(i % 64, 512).status == VIRTIO_BLK_S_OK
        assert blk.read(0, 512).status == VIRTIO_BLK_S_OK    # everything applied
        assert d.fd_count() == fds
        assert d.memfd_maps() == maps
    finally:
        fe.close()
    assert d.alive
