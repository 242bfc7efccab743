"""virtio-blk (virtio 1.2 section 5.2) on a regular file or block device."""

from __future__ import annotations

import enum
import logging
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vhostd.devices.base import (COMMON_FEATURES, COMMON_PROTOCOL_FEATURES, Device, DeviceError, DeviceType,
                                 QueueBackend, WorkerOptions)
from vhostd.fds import OwnedFd
from vhostd.native import MAX_IOV, QOS_READ, QOS_WRITE, NativeBlk, NativeBlkQueue, NativeError
from vhostd.protocol.constants import ProtocolFeature, bit

SECTOR_SIZE = 512
MAX_QUEUES = 8
SERIAL_BYTES = 20  # VIRTIO_BLK_ID_BYTES
BLKGETSIZE64 = 0x80081272

log = logging.getLogger("vhostd.blk")


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


class Discard(enum.Enum):
    """What a guest's DISCARD does (QEMU's discard=)."""

    UNMAP = "unmap"     # punch a hole: a thin image gives the space back
    IGNORE = "ignore"   # acknowledged, nothing done


# DISCARD / WRITE_ZEROES limits in config space (virtio 1.2 5.2.4).
MAX_TRIM_SECTORS = 0x3FFFFF  # per segment: 2 GiB - 512 bytes
MAX_TRIM_SEG = 32            # VHD_BLK_MAX_SEG
# vhd_api.h VHD_BLK_DISCARD_* / VHD_BLK_ZEROES_*
_DISCARD_MODE = {Discard.IGNORE: 1, Discard.UNMAP: 2}
ZEROES_RANGE, ZEROES_PUNCH = 1, 2
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


@dataclass(frozen=True)
class BlkOptions:
    path: Path
    read_only: bool = False
    num_queues: int = 1
    serial: str = ""
    logical_block_size: int = SECTOR_SIZE
    engine: Engine = Engine.IO_URING
    direct: bool = False      # O_DIRECT (bypass the host page cache)
    discard: Discard = Discard.UNMAP
    write_cache: bool = True  # write-back until the guest asks for write-through (CONFIG_WCE)

    def __post_init__(self) -> None:
        if not 1 <= self.num_queues <= MAX_QUEUES:
            raise ValueError(f"num_queues: {self.num_queues} is not in 1..{MAX_QUEUES}")
        if len(self.serial.encode()) > SERIAL_BYTES:
            raise ValueError(f"serial: longer than {SERIAL_BYTES} bytes")


def _zeroing_mode(fd: int, path: Path) -> int:
    """How WRITE_ZEROES zeroes: ZERO_RANGE where the file system has it
    (block devices always), else a punched hole (tmpfs), which reads back
    as zeros too.  Tried on a scratch file beside the image, never on it."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        return ZEROES_RANGE
    try:
        scratch = os.open(path.parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        return ZEROES_PUNCH        # no scratch file here: the mode every Linux file system with holes has
    try:
        os.ftruncate(scratch, 8192)
        _fallocate(scratch, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, 4096)
        return ZEROES_RANGE
    except OSError:
        return ZEROES_PUNCH
    finally:
        os.close(scratch)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


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
        self.writeback = options.write_cache
        self.native.set_writethrough(not self.writeback)
        self.zeroes = _zeroing_mode(self.file.fileno(), options.path)
        self.native.set_trim(discard=_DISCARD_MODE[options.discard], zeroes=self.zeroes,
                             may_unmap=options.discard is Discard.UNMAP,
                             max_discard_sectors=MAX_TRIM_SECTORS, max_discard_seg=MAX_TRIM_SEG,
                             max_zeroes_sectors=MAX_TRIM_SECTORS, max_zeroes_seg=MAX_TRIM_SEG)
        self.discard_alignment = max(os.fstat(self.file.fileno()).st_blksize // SECTOR_SIZE, 1)
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
                  BlkFeature.FLUSH, BlkFeature.MQ, BlkFeature.CONFIG_WCE):
            f |= bit(b)
        if self.options.read_only:
            f |= bit(BlkFeature.RO)
        else:   # a read-only disk would refuse both anyway
            f |= bit(BlkFeature.DISCARD) | bit(BlkFeature.WRITE_ZEROES)
        return f

    def protocol_features(self) -> int:
        # CONFIG: QEMU's vhost-user-blk reads capacity, queues etc. with GET_CONFIG.
        # INFLIGHT_SHMFD: requests in flight survive a restart of vhostd (the
        # front-end keeps the buffer).
        # BACKEND_REQ: the back-end channel, to announce a resize (config change).
        return (COMMON_PROTOCOL_FEATURES | bit(ProtocolFeature.CONFIG) | bit(ProtocolFeature.INFLIGHT_SHMFD)
                | bit(ProtocolFeature.BACKEND_REQ))

    def config(self) -> bytes:
        """struct virtio_blk_config (virtio 1.2 5.2.4), 60 bytes."""
        return struct.pack(
            "<QII HBB I BBHI BBH IIIII B3x",
            self.native.capacity, SIZE_MAX, SEG_MAX,
            0, 0, 0,                               # geometry: not offered
            self.options.logical_block_size,
            0, 0, 0, 0,                            # topology: not offered
            int(self.writeback), 0, self.num_queues,
            MAX_TRIM_SECTORS, MAX_TRIM_SEG, self.discard_alignment,   # max_discard_sectors, _seg, alignment
            MAX_TRIM_SECTORS, MAX_TRIM_SEG,        # max_write_zeroes_sectors, _seg
            int(self.options.discard is Discard.UNMAP),                # write_zeroes_may_unmap
        )

    WRITEBACK_OFFSET = 32

    def write_config(self, offset: int, data: bytes) -> None:
        """The guest's CONFIG_WCE switch: `writeback` is the one writable byte."""
        if offset != self.WRITEBACK_OFFSET or len(data) != 1 or data[0] > 1:
            super().write_config(offset, data)
        self.writeback = bool(data[0])
        self.native.set_writethrough(not self.writeback)
        log.info("%s: write cache %s (the guest's choice)", self.name,
                 "write-back" if self.writeback else "write-through")

    def resize(self, size: int | None, shrink: bool = False) -> tuple[int, int]:
        """Online resize: a new size for a regular file (extended, or
        shrunk only with shrink), or None to take the file's or block
        device's current size.  Returns (old, new) in bytes."""
        fd = self.file.fileno()
        old = self.native.capacity * SECTOR_SIZE
        if size is not None:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise DeviceError(f"{self.options.path}: a block device is resized by its owner (then resize "
                                  f"without a size to take it)")
            if size % SECTOR_SIZE:
                raise DeviceError(f"{size} is not a multiple of {SECTOR_SIZE}")
            if size < old and not shrink:
                raise DeviceError(f"{size} bytes would shrink the disk from {old}: pass --shrink to do that")
            if self.options.read_only:
                raise DeviceError("the disk is read-only")
            try:
                os.ftruncate(fd, size)
            except OSError as e:
                raise DeviceError(f"{self.options.path}: {e.strerror}") from None
        new = _capacity_bytes(fd) // SECTOR_SIZE * SECTOR_SIZE
        self.native.set_capacity(new // SECTOR_SIZE)
        self.capacity = new // SECTOR_SIZE
        return old, new

    def status(self) -> dict[str, Any]:
        return {"file": str(self.options.path), "capacity_bytes": self.native.capacity * SECTOR_SIZE,
                "read_only": self.options.read_only, "aio": self.options.engine.value,
                "direct": self.options.direct, "num_queues": self.num_queues,
                "write_cache": "write-back" if self.writeback else "write-through",
                "discard": self.options.discard.value,
                "write_zeroes": "zero-range" if self.zeroes == ZEROES_RANGE else "punch-hole",
                "in_flight": [q.in_flight for q in self.queues]}

    def queue_backend(self, index: int) -> QueueBackend:
        if self.queues:
            q = self.queues[index]
            return QueueBackend(q.kind, q.ptr, q.completion_fd, qos_classes=QOS_READ | QOS_WRITE)
        return QueueBackend(self.native.kind, self.native.ptr, exclusive=True,   # sync I/O blocks
                            qos_classes=QOS_READ | QOS_WRITE)

    def _close_files(self) -> None:
        self.file.close()
        if self.direct_file is not None:
            self.direct_file.close()

    def close(self) -> None:
        for q in self.queues:
            q.close()
        self.native.close()
        self._close_files()
        self.qos.close()


def _open(path: Path, flags: int) -> OwnedFd:
    try:
        return OwnedFd(os.open(path, flags))
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from e   # the errno, for the daemon's hints
