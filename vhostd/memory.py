"""Guest memory as sent by SET_MEM_TABLE: mapped once, immutable after.

A ``GuestMemory`` is never changed in place: a new table is built, the ring
workers are stopped, the tables are swapped and the workers restarted
(``Session._replace_memory``).  That keeps the C side lock-free and is how
memory hotplug (ADD/REM_MEM_REG) will work too.
"""

from __future__ import annotations

from collections.abc import Sequence
from vhostd.fds import OwnedFd, close_all
import os
from typing import Any

from vhostd.native import MemTable, NativeError, SharedMapping, ffi, inflight_queue_size
from vhostd.protocol.messages import MemRegion


class GuestMemoryError(ValueError):
    pass


class GuestMemory:
    def __init__(self, regions: Sequence[MemRegion], fds: Sequence[OwnedFd]) -> None:
        """Maps every region; closes the fds in all cases (the mappings stay)."""
        self.regions = tuple(regions)
        self.table = MemTable()
        try:
            if len(fds) != len(regions):
                raise GuestMemoryError(f"{len(regions)} regions but {len(fds)} fds")
            for i, (r, fd) in enumerate(zip(regions, fds)):
                try:
                    self.table.add(fd.fileno(), r.guest_phys_addr, r.memory_size,
                                   r.userspace_addr, r.mmap_offset)
                except NativeError as e:
                    raise GuestMemoryError(
                        f"region {i} (gpa {r.guest_phys_addr:#x} size {r.memory_size:#x} "
                        f"uva {r.userspace_addr:#x} offset {r.mmap_offset:#x}): {e.strerror}"
                    ) from None
        except BaseException:
            self.table.close()
            raise
        finally:
            close_all(fds)

    @property
    def size(self) -> int:
        return sum(r.memory_size for r in self.regions)

    @property
    def gpa_end(self) -> int:
        """One past the highest guest-physical address (what a dirty log must cover)."""
        return max((r.guest_phys_addr + r.memory_size for r in self.regions), default=0)

    def close(self) -> None:
        self.table.close()


class InflightBuffer:
    """The VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD buffer: one region per ring
    recording which requests are in flight, kept by the front-end across
    back-end restarts so a new back-end resubmits them."""

    def __init__(self, fd: OwnedFd, mmap_size: int, mmap_offset: int,
                 num_queues: int, queue_size: int) -> None:
        """Maps fd (SET_INFLIGHT_FD, or one we created); closes fd."""
        try:
            per_queue = inflight_queue_size(queue_size)
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

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> tuple[InflightBuffer, OwnedFd]:
        """A new zeroed buffer and the fd to hand the front-end (GET_INFLIGHT_FD)."""
        size = num_queues * inflight_queue_size(queue_size)
        fd = OwnedFd(os.memfd_create("vhostd-inflight", os.MFD_CLOEXEC))
        os.ftruncate(fd.fileno(), size)
        ours = OwnedFd(os.dup(fd.fileno()))
        return cls(ours, size, 0, num_queues, queue_size), fd

    def region(self, ring: int) -> Any:
        """C pointer to ring's region, or NULL for rings beyond the buffer."""
        if ring >= self.num_queues:
            return ffi.NULL
        return self.mapping.at(ring * self.per_queue)

    def close(self) -> None:
        self.mapping.close()
