"""Guest memory: the regions the front-end shares, mapped, and the C
translation table the workers use.

A ``GuestMemory`` is never changed in place.  SET_MEM_TABLE builds a new one;
ADD_MEM_REG and REM_MEM_REG (CONFIGURE_MEM_SLOTS) derive one from the
current one, sharing the mappings of the regions they keep.  The session
hands the new table to the running workers (``Session._apply_memory``) and
only then frees the old table, and unmaps a region once no table a worker
may use still holds it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vhostd.fds import OwnedFd, close_all
from vhostd.native import MAX_MEM_SLOTS, MemTable, NativeError, RegionMapping, SharedMapping, ffi, \
    inflight_queue_size
from vhostd.protocol.messages import MemRegion


class GuestMemoryError(ValueError):
    pass


def _describe(r: MemRegion) -> str:
    return (f"gpa {r.guest_phys_addr:#x} size {r.memory_size:#x} uva {r.userspace_addr:#x} "
            f"offset {r.mmap_offset:#x}")


def _overlap(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


@dataclass(frozen=True)
class GuestRegion:
    """A region as the front-end described it, and its mapping."""

    desc: MemRegion
    mapping: RegionMapping

    @classmethod
    def map(cls, r: MemRegion, fd: OwnedFd, table: Sequence[GuestRegion] = ()) -> GuestRegion:
        """Maps r from fd (or shares another device's mapping of the same
        range, never one of `table`'s); closes fd."""
        try:
            if r.memory_size == 0:
                raise GuestMemoryError(f"region ({_describe(r)}): size 0")
            if (r.guest_phys_addr + r.memory_size > 1 << 64 or r.userspace_addr + r.memory_size > 1 << 64
                    or r.mmap_offset + r.memory_size > 1 << 64):
                raise GuestMemoryError(f"region ({_describe(r)}): wraps around the address space")
            try:
                mapping = RegionMapping.open(fd.fileno(), r.memory_size, r.mmap_offset,
                                             {g.mapping for g in table})
                return cls(r, mapping)
            except NativeError as e:
                raise GuestMemoryError(f"region ({_describe(r)}): {e.strerror}") from None
        finally:
            fd.close()

    def matches(self, r: MemRegion) -> bool:
        """REM_MEM_REG identifies a region by gpa, uva and size (not the offset)."""
        d = self.desc
        return (d.guest_phys_addr, d.userspace_addr, d.memory_size) == \
               (r.guest_phys_addr, r.userspace_addr, r.memory_size)

    def unmap(self) -> None:
        self.mapping.close()


class GuestMemory:
    def __init__(self, regions: Sequence[GuestRegion]) -> None:
        """The table over regions (already mapped, and still the caller's to
        unmap if this fails)."""
        if len(regions) > MAX_MEM_SLOTS:
            raise GuestMemoryError(f"{len(regions)} memory regions, at most {MAX_MEM_SLOTS}")
        for i, a in enumerate(regions):
            for j in range(i):
                b, da = regions[j].desc, a.desc
                if _overlap(da.guest_phys_addr, da.memory_size, b.guest_phys_addr, b.memory_size):
                    raise GuestMemoryError(f"region ({_describe(da)}) overlaps region ({_describe(b)}) "
                                           f"in guest-physical space")
                if _overlap(da.userspace_addr, da.memory_size, b.userspace_addr, b.memory_size):
                    raise GuestMemoryError(f"region ({_describe(da)}) overlaps region ({_describe(b)}) "
                                           f"in the front-end's address space")
        self.regions = tuple(regions)
        self.table = MemTable()
        try:
            for g in regions:
                d = g.desc
                try:
                    self.table.add_mapped(d.guest_phys_addr, d.memory_size, d.userspace_addr, g.mapping)
                except NativeError as e:
                    raise GuestMemoryError(f"region ({_describe(d)}): {e.strerror}") from None
        except BaseException:
            self.table.close()
            raise

    @classmethod
    def from_table(cls, regions: Sequence[MemRegion], fds: Sequence[OwnedFd]) -> GuestMemory:
        """SET_MEM_TABLE: maps every region; closes the fds in all cases."""
        mapped: list[GuestRegion] = []
        try:
            if len(fds) != len(regions):
                raise GuestMemoryError(f"{len(regions)} regions but {len(fds)} fds")
            for i, (r, fd) in enumerate(zip(regions, fds)):
                try:
                    mapped.append(GuestRegion.map(r, fd, mapped))
                except GuestMemoryError as e:
                    raise GuestMemoryError(f"region {i} {str(e).removeprefix('region ')}") from None
            return cls(mapped)
        except BaseException:
            for g in mapped:
                g.unmap()
            raise
        finally:
            close_all(fds)

    def with_region(self, r: MemRegion, fd: OwnedFd) -> tuple[GuestMemory, GuestRegion]:
        """ADD_MEM_REG: a table with one more region (mapped here; closes fd)."""
        if len(self.regions) >= MAX_MEM_SLOTS:
            fd.close()
            raise GuestMemoryError(f"region ({_describe(r)}): all {MAX_MEM_SLOTS} memory slots are in use")
        g = GuestRegion.map(r, fd, self.regions)
        try:
            return GuestMemory((*self.regions, g)), g
        except BaseException:
            g.unmap()
            raise

    def without(self, r: MemRegion) -> tuple[GuestMemory, GuestRegion]:
        """REM_MEM_REG: a table without the region r names (nothing unmapped)."""
        for g in self.regions:
            if g.matches(r):
                return GuestMemory(tuple(x for x in self.regions if x is not g)), g
        raise GuestMemoryError(f"no region with gpa {r.guest_phys_addr:#x} size {r.memory_size:#x} "
                               f"uva {r.userspace_addr:#x} (the table has {len(self.regions)})")

    @property
    def size(self) -> int:
        return sum(g.desc.memory_size for g in self.regions)

    @property
    def gpa_end(self) -> int:
        """One past the highest guest-physical address (what a dirty log must cover)."""
        return max((g.desc.guest_phys_addr + g.desc.memory_size for g in self.regions), default=0)

    def close(self) -> None:
        """Frees the C table; the mappings are the session's to unmap."""
        self.table.close()

    def unmap(self) -> None:
        """Unmaps every region (no table in use may hold them any more)."""
        for g in self.regions:
            g.unmap()


class InflightBuffer:
    """The VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD buffer: one region per ring
    recording which requests are in flight, kept by the front-end across
    back-end restarts so a new back-end resubmits them."""

    def __init__(self, fd: OwnedFd, mmap_size: int, mmap_offset: int,
                 num_queues: int, queue_size: int, packed: bool = False) -> None:
        """Maps fd (SET_INFLIGHT_FD, or one we created); closes fd.  packed:
        the regions have the packed layout (the front-end sets features
        before it asks for the buffer)."""
        try:
            per_queue = inflight_queue_size(queue_size, packed)
            if mmap_size != num_queues * per_queue:
                raise GuestMemoryError(f"inflight buffer of {mmap_size} bytes, expected "
                                       f"{num_queues * per_queue} for {num_queues} queues of {queue_size}")
            if os.fstat(fd.fileno()).st_size < mmap_offset + mmap_size:
                raise GuestMemoryError("inflight fd is smaller than mmap_offset + mmap_size")
            try:
                self.mapping = SharedMapping(fd.fileno(), mmap_size, mmap_offset)
            except NativeError as e:
                raise GuestMemoryError(f"inflight buffer: {e.strerror}") from None
        finally:
            fd.close()
        self.mmap_size = mmap_size
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.per_queue = per_queue
        self.packed = packed

    @classmethod
    def create(cls, num_queues: int, queue_size: int, packed: bool = False) -> tuple[InflightBuffer, OwnedFd]:
        """A new zeroed buffer and the fd to hand the front-end (GET_INFLIGHT_FD)."""
        size = num_queues * inflight_queue_size(queue_size, packed)
        fd = OwnedFd(os.memfd_create("vhostd-inflight", os.MFD_CLOEXEC))
        os.ftruncate(fd.fileno(), size)
        ours = OwnedFd(os.dup(fd.fileno()))
        return cls(ours, size, 0, num_queues, queue_size, packed), fd

    def region(self, ring: int) -> Any:
        """C pointer to ring's region, or NULL for rings beyond the buffer."""
        if ring >= self.num_queues:
            return ffi.NULL
        return self.mapping.at(ring * self.per_queue)

    def close(self) -> None:
        self.mapping.close()
