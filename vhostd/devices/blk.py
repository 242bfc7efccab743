"""virtio-blk (virtio 1.2 section 5.2) on a regular file or block device."""

from __future__ import annotations

import enum
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vhostd.devices.base import COMMON_FEATURES, COMMON_PROTOCOL_FEATURES, Device, DeviceType, QueueBackend, WorkerOptions
from vhostd.fds import OwnedFd
from vhostd.native import MAX_IOV, NativeBlk, NativeBlkQueue, NativeError
from vhostd.protocol.constants import ProtocolFeature, bit

SECTOR_SIZE = 512
MAX_QUEUES = 8
SERIAL_BYTES = 20  # VIRTIO_BLK_ID_BYTES
BLKGETSIZE64 = 0x80081272


class BlkFeature(enum.IntEnum):
    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


# Segment limits the guest must honour: a request's data plus header and
# status must fit the C side's iovec array (a buffer that straddles two
# memory regions takes two entries, hence the halving).
SEG_MAX = MAX_IOV // 2 - 2
SIZE_MAX = 1 << 20


class Engine(enum.Enum):
    """How a queue's requests reach the file."""

    IO_URING = "io_uring"   # many in flight, batched submission (default)
    SYNC = "sync"           # one preadv/pwritev at a time per queue, a thread per queue


# Requests in flight per queue with io_uring.
URING_DEPTH = 128


@dataclass(frozen=True)
class BlkOptions:
    path: Path
    read_only: bool = False
    num_queues: int = 1
    serial: str = ""
    logical_block_size: int = SECTOR_SIZE
    engine: Engine = Engine.IO_URING
    direct: bool = False      # O_DIRECT (bypass the host page cache)

    def __post_init__(self) -> None:
        if not 1 <= self.num_queues <= MAX_QUEUES:
            raise ValueError(f"num_queues: {self.num_queues} is not in 1..{MAX_QUEUES}")
        if len(self.serial.encode()) > SERIAL_BYTES:
            raise ValueError(f"serial: longer than {SERIAL_BYTES} bytes")


def _capacity_bytes(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("<Q", buf)[0])
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    raise ValueError("not a regular file or block device")


class BlkDevice(Device):
    device_type = DeviceType.BLOCK
    feature_enum = BlkFeature

    def __init__(self, name: str, options: BlkOptions, workers: WorkerOptions = WorkerOptions()) -> None:
        super().__init__(name, workers)
        self.options = options
        flags = (os.O_RDONLY if options.read_only else os.O_RDWR) | os.O_CLOEXEC
        self.file = _open(options.path, flags)
        # With O_DIRECT a second, buffered fd serves requests whose guest
        # buffers are not aligned enough for the kernel to DMA into.
        self.direct_file = _open(options.path, flags | os.O_DIRECT) if options.direct else None
        try:
            size = _capacity_bytes(self.file.fileno())
        except ValueError as e:
            self._close_files()
            raise ValueError(f"{options.path}: {e}") from None
        self.capacity = size // SECTOR_SIZE
        main = self.direct_file or self.file
        self.native = NativeBlk(main.fileno(), self.capacity, options.read_only,
                                options.serial.encode(),
                                buffered_fd=self.file.fileno() if self.direct_file else -1)
        self.queues: list[NativeBlkQueue] = []
        if options.engine is Engine.IO_URING:
            try:
                self.queues = [NativeBlkQueue(self.native, URING_DEPTH) for _ in range(options.num_queues)]
            except NativeError as e:
                self.close()
                raise ValueError(f"io_uring unavailable ({e.strerror}): use the sync engine") from None

    @property
    def num_queues(self) -> int:
        return self.options.num_queues

    def features(self) -> int:
        f = COMMON_FEATURES
        for b in (BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE,
                  BlkFeature.FLUSH, BlkFeature.MQ):
            f |= bit(b)
        if self.options.read_only:
            f |= bit(BlkFeature.RO)
        return f

    def protocol_features(self) -> int:
        # CONFIG: QEMU's vhost-user-blk reads capacity, queues etc. with GET_CONFIG.
        # INFLIGHT_SHMFD: requests in flight survive a restart of vhostd (the
        # front-end keeps the buffer).
        return COMMON_PROTOCOL_FEATURES | bit(ProtocolFeature.CONFIG) | bit(ProtocolFeature.INFLIGHT_SHMFD)

    def config(self) -> bytes:
        """struct virtio_blk_config up to num_queues (later fields stay zero)."""
        return struct.pack(
            "<QII HBB I BBHI BBH",
            self.capacity, SIZE_MAX, SEG_MAX,
            0, 0, 0,                               # geometry: not offered
            self.options.logical_block_size,
            0, 0, 0, 0,                            # topology: not offered
            0, 0, self.num_queues,                 # writeback, unused0, num_queues
        ).ljust(60, b"\0")

    def status(self) -> dict[str, Any]:
        return {"file": str(self.options.path), "capacity_bytes": self.capacity * SECTOR_SIZE,
                "read_only": self.options.read_only, "aio": self.options.engine.value,
                "direct": self.options.direct, "num_queues": self.num_queues,
                "in_flight": [q.in_flight for q in self.queues]}

    def queue_backend(self, index: int) -> QueueBackend:
        if self.queues:
            q = self.queues[index]
            return QueueBackend(q.kind, q.ptr, q.completion_fd)
        return QueueBackend(self.native.kind, self.native.ptr, exclusive=True)   # sync I/O blocks

    def _close_files(self) -> None:
        self.file.close()
        if self.direct_file is not None:
            self.direct_file.close()

    def close(self) -> None:
        for q in self.queues:
            q.close()
        self.native.close()
        self._close_files()


def _open(path: Path, flags: int) -> OwnedFd:
    try:
        return OwnedFd(os.open(path, flags))
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from e   # the errno, for the daemon's hints
