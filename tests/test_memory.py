"""Guest memory translation (``vhostd.native.MemTable`` over memfds, and
``vhostd.memory.GuestMemory``)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhd_helpers import fd_is_closed, pattern
from vhostd.fds import OwnedFd
from vhostd.memory import GuestMemory, GuestMemoryError
from vhostd.native import MAX_MEM_SLOTS, MemTable, NativeError
from vhostd.protocol.messages import MemRegion

pytestmark = pytest.mark.usefixtures("watchdog")

PAGE = 4096
U64_MAX = 2**64 - 1


def memfd(size: int, data: bytes | None = None) -> int:
    fd = os.memfd_create("vhostd-test-mem", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if data is not None:
        os.pwrite(fd, data, 0)
    return fd


def peek(hva: int, n: int) -> bytes:
    return ctypes.string_at(hva, n)


@dataclass
class Region:
    gpa: int
    size: int
    uva: int
    data: bytes
    fd: int


class Layout:
    """Three regions: A and B adjacent in GPA space, C after a gap.
    UVAs are arbitrary (they need not be real addresses for the table)."""

    def __init__(self) -> None:
        self.table = MemTable()
        specs = [(0x10_0000, 0x1_0000, 0x7F00_0000_0000),
                 (0x11_0000, 0x2_0000, 0x7E00_0000_0000),   # A+size: adjacent
                 (0x20_0000, 0x1000, 0x7D00_0000_0000)]     # after a gap
        self.regions = []
        for i, (gpa, size, uva) in enumerate(specs):
            data = pattern(size, seed=i + 10)
            fd = memfd(size, data)
            self.table.add(fd, gpa, size, uva, 0)
            self.regions.append(Region(gpa, size, uva, data, fd))

    def expected_bytes(self, gpa: int, length: int) -> bytes | None:
        """The guest bytes at [gpa, gpa+length), or None if any is outside memory."""
        out = bytearray()
        while length:
            for r in self.regions:
                if r.gpa <= gpa < r.gpa + r.size:
                    n = min(length, r.gpa + r.size - gpa)
                    out += r.data[gpa - r.gpa: gpa - r.gpa + n]
                    gpa, length = gpa + n, length - n
                    break
            else:
                return None
        return bytes(out)

    def close(self) -> None:
        self.table.close()
        for r in self.regions:
            os.close(r.fd)


@pytest.fixture
def layout() -> Iterator[Layout]:
    lay = Layout()
    yield lay
    lay.close()


def test_region_count(layout: Layout) -> None:
    assert len(layout.table) == 3


def test_lookup_at_region_edges(layout: Layout) -> None:
    a, b, c = layout.regions
    t = layout.table
    first = t.gpa_to_hva(a.gpa, 1)
    assert first is not None and peek(first, 16) == a.data[:16]
    whole = t.gpa_to_hva(a.gpa, a.size)
    assert whole == first
    last = t.gpa_to_hva(a.gpa + a.size - 1, 1)
    assert last == first + a.size - 1 and peek(last, 1) == a.data[-1:]
    assert t.gpa_to_hva(a.gpa - 1, 1) is None
    assert t.gpa_to_hva(a.gpa - 1, 2) is None            # starts just before memory
    assert t.gpa_to_hva(a.gpa, a.size + 1) is None       # one byte into B: two regions
    hb = t.gpa_to_hva(b.gpa, 8)
    assert hb is not None and peek(hb, 8) == b.data[:8]
    assert t.gpa_to_hva(c.gpa + c.size - 4, 4) is not None
    assert t.gpa_to_hva(c.gpa + c.size - 4, 5) is None
    assert t.gpa_to_hva(c.gpa + c.size, 1) is None       # just past the end
    assert t.gpa_to_hva(b.gpa + b.size, 1) is None       # in the gap


def test_range_crossing_two_adjacent_regions(layout: Layout) -> None:
    a, b, _ = layout.regions
    t = layout.table
    gpa = a.gpa + a.size - 8
    assert t.gpa_to_hva(gpa, 24) is None
    iov = t.gpa_to_iov(gpa, 24)
    assert len(iov) == 2
    (h1, n1), (h2, n2) = iov
    assert (n1, n2) == (8, 16)
    assert h1 == t.gpa_to_hva(gpa, 8) and h2 == t.gpa_to_hva(b.gpa, 16)
    assert peek(h1, n1) + peek(h2, n2) == a.data[-8:] + b.data[:16]


def test_iov_limit(layout: Layout) -> None:
    a, b, _ = layout.regions
    with pytest.raises(NativeError) as ei:
        layout.table.gpa_to_iov(a.gpa + a.size - 8, 24, max_iov=1)
    assert ei.value.errno == errno.ENOBUFS
    assert len(layout.table.gpa_to_iov(a.gpa + a.size - 8, 24, max_iov=2)) == 2


@pytest.mark.parametrize("gpa_from,length", [
    ("c_end", 1), ("c_end-1", 2), ("gap", 1), ("b_end-8", 16), ("a_start-1", 1), ("zero", 16),
])
def test_past_the_end_or_in_a_gap_fails(layout: Layout, gpa_from: str, length: int) -> None:
    a, b, c = layout.regions
    gpa = {"c_end": c.gpa + c.size, "c_end-1": c.gpa + c.size - 1, "gap": b.gpa + b.size + 100,
           "b_end-8": b.gpa + b.size - 8, "a_start-1": a.gpa - 1, "zero": 0}[gpa_from]
    assert layout.table.gpa_to_hva(gpa, length) is None
    with pytest.raises(NativeError) as ei:
        layout.table.gpa_to_iov(gpa, length)
    assert ei.value.errno == errno.EFAULT


@pytest.mark.parametrize("gpa,length", [
    (2**64 - 16, 32),              # wraps past 2**64
    (2**64 - 16, 16),              # ends exactly at 2**64: outside memory anyway
    (0x10_0000, U64_MAX),          # starts inside A, length wraps back into memory
    (0x10_0010, 2**64 - 0x10),     # gpa+len == 2**64 exactly (wraps to 0)
    (0x11_0000, 2**64 - 0x1_0000 + 8),   # wraps to A's start + 8
    (U64_MAX, 1),
    (U64_MAX, U64_MAX),
])
def test_address_plus_length_overflow(layout: Layout, gpa: int, length: int) -> None:
    assert layout.table.gpa_to_hva(gpa, length) is None
    assert layout.table.uva_to_hva(gpa, length) is None
    with pytest.raises(NativeError) as ei:
        layout.table.gpa_to_iov(gpa, length)
    assert ei.value.errno == errno.EFAULT


def test_overflow_with_a_region_at_the_top_of_the_address_space() -> None:
    t = MemTable()
    fd = memfd(PAGE)
    try:
        t.add(fd, 2**64 - 2 * PAGE, PAGE, 0x1000, 0)
        top = 2**64 - 2 * PAGE
        assert t.gpa_to_hva(top, PAGE) is not None
        assert t.gpa_to_hva(top + PAGE - 1, 1) is not None
        assert t.gpa_to_hva(top + 16, 2**64 - 16) is None
        assert t.gpa_to_hva(top, PAGE + 1) is None
        with pytest.raises(NativeError):
            t.gpa_to_iov(top + PAGE - 8, 2**64 - PAGE)
    finally:
        t.close()
        os.close(fd)


def test_zero_length(layout: Layout) -> None:
    a, _, c = layout.regions
    t = layout.table
    assert t.gpa_to_hva(a.gpa + 5, 0) == t.gpa_to_hva(a.gpa + 5, 1)
    assert t.gpa_to_hva(c.gpa + c.size, 0) is None   # a zero-length range still needs its start inside
    assert t.gpa_to_iov(a.gpa + 5, 0) == []
    # No byte is touched, so no translation is needed even outside memory.
    assert t.gpa_to_iov(0, 0) == []


def test_uva_translation(layout: Layout) -> None:
    for r in layout.regions:
        for off in (0, 1, r.size // 2, r.size - 1):
            h = layout.table.uva_to_hva(r.uva + off, 1)
            assert h is not None and h == layout.table.gpa_to_hva(r.gpa + off, 1)
            assert peek(h, 1) == r.data[off: off + 1]
        assert layout.table.uva_to_hva(r.uva, r.size) is not None
        assert layout.table.uva_to_hva(r.uva, r.size + 1) is None
        assert layout.table.uva_to_hva(r.uva - 1, 1) is None
        assert layout.table.uva_to_hva(r.uva + r.size, 1) is None
    a = layout.regions[0]
    assert layout.table.uva_to_hva(a.gpa, 1) is None    # a GPA is not a UVA


def test_mapping_outlives_the_fd() -> None:
    t = MemTable()
    data = pattern(PAGE, seed=3)
    fd = memfd(PAGE, data)
    t.add(fd, 0x1000, PAGE, 0x5000, 0)
    os.close(fd)
    try:
        h = t.gpa_to_hva(0x1000, PAGE)
        assert h is not None and peek(h, PAGE) == data
    finally:
        t.close()


@pytest.mark.parametrize("offset", [1, 123, 4095, PAGE, PAGE + 7, 3 * PAGE])
def test_mmap_offset_not_page_aligned(offset: int) -> None:
    size = 2 * PAGE
    data = pattern(offset + size, seed=4)
    fd = memfd(offset + size, data)
    t = MemTable()
    try:
        t.add(fd, 0x10_0000, size, 0x7000_0000, offset)
        h = t.gpa_to_hva(0x10_0000, size)
        assert h is not None and peek(h, size) == data[offset:]
        # Writes through the table land at file offset mmap_offset + (gpa - start).
        ctypes.memmove(h + 10, b"XYZ", 3)
        assert os.pread(fd, 3, offset + 10) == b"XYZ"
        u = t.uva_to_hva(0x7000_0000 + 5, 1)
        assert u == h + 5
    finally:
        t.close()
        os.close(fd)


# --- rejected regions -------------------------------------------------------------------

def add_err(t: MemTable, fd: int, gpa: int, size: int, uva: int, off: int = 0) -> int:
    with pytest.raises(NativeError) as ei:
        t.add(fd, gpa, size, uva, off)
    assert ei.value.errno is not None
    return ei.value.errno


@pytest.fixture
def one_region() -> Iterator[tuple[MemTable, int]]:
    """A table holding [0x10000, 0x20000) at uva 0x7F0000000000, and a spare 64 KiB memfd."""
    t = MemTable()
    fd = memfd(0x1_0000)
    t.add(fd, 0x1_0000, 0x1_0000, 0x7F00_0000_0000, 0)
    yield t, fd
    t.close()
    os.close(fd)


@pytest.mark.parametrize("gpa,size", [
    (0x1_0000, 0x1_0000),      # identical
    (0x1_8000, 0x1000),        # inside
    (0x0_8000, 0x1_0000),      # overlaps the start
    (0x1_F000, 0x2000),        # overlaps the end
    (0x0, 0x10_0000),          # covers it
    (0x1_FFFF, 1),             # last byte
])
def test_overlapping_gpa_rejected(one_region: tuple[MemTable, int], gpa: int, size: int) -> None:
    t, fd = one_region
    assert add_err(t, fd, gpa, size, 0x1000_0000) == errno.EINVAL
    assert len(t) == 1


def test_overlapping_uva_rejected(one_region: tuple[MemTable, int]) -> None:
    t, fd = one_region
    assert add_err(t, fd, 0x100_0000, 0x1000, 0x7F00_0000_0000 + 0xF000) == errno.EINVAL
    assert add_err(t, fd, 0x100_0000, 0x2000, 0x7F00_0000_0000 - 0x1000) == errno.EINVAL
    assert len(t) == 1


def test_touching_regions_accepted(one_region: tuple[MemTable, int]) -> None:
    t, fd = one_region
    t.add(fd, 0x2_0000, 0x1000, 0x7F00_0001_0000, 0)       # right after, in both spaces
    t.add(fd, 0x0_F000, 0x1000, 0x7F00_0000_0000 - 0x1000, 0)   # right before
    assert len(t) == 3
    assert t.gpa_to_iov(0x0_FFF8, 16) and len(t.gpa_to_iov(0x0_F000, 0x1_2000)) == 3


def test_zero_size_region_rejected(one_region: tuple[MemTable, int]) -> None:
    t, fd = one_region
    assert add_err(t, fd, 0x100_0000, 0, 0x1000_0000) == errno.EINVAL
    assert len(t) == 1


@pytest.mark.parametrize("gpa,uva,off", [
    (2**64 - 0x1000, 0x1000_0000, 0),     # gpa + size wraps
    (0x100_0000, 2**64 - 0x1000, 0),      # uva + size wraps
    (0x100_0000, 0x1000_0000, 2**64 - 0x1000),   # mmap_offset + size wraps
])
def test_overflowing_region_rejected(one_region: tuple[MemTable, int], gpa: int, uva: int, off: int) -> None:
    t, fd = one_region
    assert add_err(t, fd, gpa, 0x2000, uva, off) == errno.EINVAL


def test_table_full() -> None:
    t = MemTable()
    fd = memfd(PAGE)
    try:
        for i in range(MAX_MEM_SLOTS):
            t.add(fd, 0x10_0000 * (i + 1), PAGE, 0x10_0000 * (i + 1), 0)
        assert len(t) == MAX_MEM_SLOTS == 509
        assert add_err(t, fd, 0x1000_0000, PAGE, 0x1000_0000) == errno.ENOSPC
    finally:
        t.close()
        os.close(fd)


def test_unmappable_fd_rejected() -> None:
    t = MemTable()
    r, w = os.pipe()
    try:
        assert add_err(t, r, 0x1000, PAGE, 0x1000) in (errno.ENODEV, errno.EACCES)
        assert len(t) == 0
    finally:
        t.close()
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("file_size,offset,size", [
    (PAGE, 0, 16 * PAGE),          # region larger than the memfd
    (16 * PAGE, 8 * PAGE, 16 * PAGE),   # offset + size past the end
    (16 * PAGE, 16 * PAGE, PAGE),  # starts at the end
])
def test_region_beyond_the_end_of_its_file_rejected(file_size: int, offset: int, size: int) -> None:
    """Touching a MAP_SHARED page past the end of a memfd raises SIGBUS: a
    front-end must not be able to kill the daemon with a short memfd."""
    t = MemTable()
    fd = memfd(file_size)
    try:
        assert add_err(t, fd, 0x10_0000, size, 0x7000_0000, offset) == errno.EINVAL
        assert len(t) == 0
    finally:
        t.close()
        os.close(fd)


def test_region_exactly_filling_its_file_accepted() -> None:
    t = MemTable()
    fd = memfd(4 * PAGE + 100)
    try:
        t.add(fd, 0x10_0000, 4 * PAGE, 0x7000_0000, 100)
        assert len(t) == 1
    finally:
        t.close()
        os.close(fd)


# --- property: translation covers exactly the bytes in memory ------------------------------

def interesting_gpas() -> st.SearchStrategy[int]:
    edges = [0x10_0000, 0x11_0000, 0x13_0000, 0x20_0000, 0x20_1000]
    near = st.builds(lambda e, d: (e + d) % 2**64, st.sampled_from(edges), st.integers(-40, 40))
    return st.one_of(near, st.integers(0x10_0000 - 64, 0x20_1000 + 64), st.integers(0, 2**64 - 1),
                     st.integers(2**64 - 64, 2**64 - 1))


lengths = st.one_of(st.integers(0, 80), st.integers(0, 0x3_0000), st.integers(0, 2**64 - 1),
                    st.sampled_from([0x1_0000, 0x2_0000, 0x3_0000, 0x3_0001, 2**64 - 1]))


@settings(max_examples=600)
@given(interesting_gpas(), lengths)
def test_translation_covers_exactly_the_guest_bytes(gpa: int, length: int) -> None:
    lay = LAYOUT
    want = lay.expected_bytes(gpa, length) if gpa + length <= 2**64 else None
    try:
        iov = lay.table.gpa_to_iov(gpa, length)
    except NativeError as e:
        assert e.errno == errno.EFAULT
        assert want is None, f"translation of a range inside memory failed: {gpa:#x}+{length:#x}"
    else:
        assert want is not None, f"range outside memory translated: {gpa:#x}+{length:#x} -> {iov}"
        assert sum(n for _, n in iov) == length
        assert all(n > 0 for _, n in iov)
        assert len(iov) <= 3
        assert b"".join(peek(h, n) for h, n in iov) == want
        # Contiguous GPA range inside one region <=> a single host pointer.
        hva = lay.table.gpa_to_hva(gpa, length)
        if len(iov) == 1:
            assert hva == iov[0][0]
        elif length:
            assert hva is None


LAYOUT: Layout


def setup_module() -> None:
    global LAYOUT
    LAYOUT = Layout()


def teardown_module() -> None:
    LAYOUT.close()


# --- GuestMemory (the Python owner of a table) ----------------------------------------------

def test_guest_memory_maps_all_regions_and_closes_fds() -> None:
    fds = [OwnedFd(memfd(PAGE, b"A" * PAGE)), OwnedFd(memfd(2 * PAGE, b"B" * 2 * PAGE))]
    raw = [f.fileno() for f in fds]
    regions = [MemRegion(0x1000, PAGE, 0x7000_0000, 0), MemRegion(0x2000, 2 * PAGE, 0x7100_0000, 0)]
    gm = GuestMemory.from_table(regions, fds)
    try:
        assert all(fd_is_closed(fd) for fd in raw)
        assert gm.size == 3 * PAGE and len(gm.table) == 2
        iov = gm.table.gpa_to_iov(0x1000 + PAGE - 2, 4)
        assert b"".join(peek(h, n) for h, n in iov) == b"AABB"
    finally:
        gm.close()
        gm.unmap()


def test_guest_memory_fd_count_mismatch_closes_fds() -> None:
    fds = [OwnedFd(memfd(PAGE))]
    raw = fds[0].fileno()
    with pytest.raises(GuestMemoryError, match="2 regions but 1 fds"):
        GuestMemory.from_table([MemRegion(0x1000, PAGE, 0x1000, 0), MemRegion(0x2000, PAGE, 0x2000, 0)], fds)
    assert fd_is_closed(raw)


def test_guest_memory_bad_region_names_it_and_closes_fds() -> None:
    fds = [OwnedFd(memfd(PAGE)), OwnedFd(memfd(PAGE))]
    raw = [f.fileno() for f in fds]
    regions = [MemRegion(0x1000, PAGE, 0x7000_0000, 0), MemRegion(0x1800, PAGE, 0x7100_0000, 0)]
    with pytest.raises(GuestMemoryError) as ei:
        GuestMemory.from_table(regions, fds)
    assert str(ei.value) == ("region (gpa 0x1800 size 0x1000 uva 0x71000000 offset 0x0) overlaps region "
                             "(gpa 0x1000 size 0x1000 uva 0x70000000 offset 0x0) in guest-physical space")
    assert all(fd_is_closed(fd) for fd in raw)


def test_memfd_mapping_released_on_close() -> None:
    def memfd_maps() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for ln in f if "vhostd-test-unmap" in ln)

    fd = os.memfd_create("vhostd-test-unmap", os.MFD_CLOEXEC)
    os.ftruncate(fd, PAGE)
    gm = GuestMemory.from_table([MemRegion(0x1000, PAGE, 0x1000, 0)], [OwnedFd(fd)])
    assert memfd_maps() == 1
    gm.close()
    assert memfd_maps() == 1      # the table goes; the mapping is the owner's
    gm.unmap()
    assert memfd_maps() == 0
    gm.close()    # idempotent
    gm.unmap()


def test_python_mmap_and_table_share_pages() -> None:
    fd = memfd(PAGE)
    m = mmap.mmap(fd, PAGE)
    t = MemTable()
    try:
        t.add(fd, 0x1000, PAGE, 0x1000, 0)
        h = t.gpa_to_hva(0x1000, PAGE)
        assert h is not None
        m[100:104] = b"ping"
        assert peek(h + 100, 4) == b"ping"
    finally:
        t.close()
        m.close()
        os.close(fd)


def _mapped(addr: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


def test_devices_of_one_guest_share_one_mapping_per_file_range() -> None:
    """Two tables (two devices of one guest, each handed its own fd of the
    same memfd) map the range once; it stays mapped until the last table
    closes.  Within one table, the same range at two guest addresses gets
    two mappings (the dirty log maps host addresses back to one GPA)."""
    data = pattern(4 * PAGE, seed=5)
    fd = memfd(4 * PAGE, data)
    r = MemRegion(0x100000, 4 * PAGE, 0x7F0000000000, 0)
    alias = MemRegion(0x200000, 4 * PAGE, 0x7F1000000000, 0)
    a = GuestMemory.from_table([r], [OwnedFd(os.dup(fd))])
    b = GuestMemory.from_table([r, alias], [OwnedFd(os.dup(fd)), OwnedFd(os.dup(fd))])
    os.close(fd)
    ha = a.table.gpa_to_hva(0x100000, PAGE)
    hb, hb_alias = b.table.gpa_to_hva(0x100000, PAGE), b.table.gpa_to_hva(0x200000, PAGE)
    assert ha is not None and ha == hb
    assert hb_alias is not None and hb_alias != hb and peek(hb_alias, PAGE) == data[:PAGE]
    a.close()
    a.unmap()
    assert _mapped(ha) and peek(ha, 4 * PAGE) == data      # b still uses it
    b.close()
    b.unmap()
    assert not _mapped(ha) and not _mapped(hb_alias)
