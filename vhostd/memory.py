"""Guest memory as sent by SET_MEM_TABLE: mapped once, immutable after.

A ``GuestMemory`` is never changed in place: a new table is built, the ring
workers are stopped, the tables are swapped and the workers restarted
(``Session._replace_memory``).  That keeps the C side lock-free and is how
memory hotplug (ADD/REM_MEM_REG) will work too.
"""

from __future__ import annotations

from collections.abc import Sequence

from vhostd.fds import OwnedFd, close_all
from vhostd.native import MemTable, NativeError
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

    def close(self) -> None:
        self.table.close()
