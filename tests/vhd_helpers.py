"""Helpers shared by vhostd's unit tests (imported by conftest.py and the tests).

``Rig``: the C data plane without a socket -- a ``NativeVring`` over a
``DriverRing`` laid out in memfd ``GuestRam``, serving a ``NativeBlk`` on a
temporary file, driven synchronously with ``NativeVring.process``.

``Daemon``: a ``vhostd blk`` subprocess with its log in a file, for the
session and fd-leak tests.
"""

from __future__ import annotations

import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vhostd._native import ffi, lib
from vhostd.frontend import (
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlkDriver,
    Buf,
    DriverRing,
    Frontend,
    GuestRam,
    RamRegion,
    make_ring,
)
from vhostd.native import MemTable, NativeBlk, NativeBlkQueue, NativeLog, NativeVring
from vhostd.protocol.constants import Request

SECTOR = 512
RAM_BASE = 0x10_0000


def pattern(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def eventfd_count(fd: int) -> int:
    """Reads (and resets) an eventfd counter; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def fd_is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == 9   # EBADF
    return False


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


# --- the native ring rig -----------------------------------------------------

class DirtyBitmap:
    """A front-end's dirty log (SET_LOG_BASE): a memfd bitmap, one bit per
    4 KiB page, with ``slack`` bytes past the declared size to catch overruns."""

    def __init__(self, size: int, slack: int = 4096) -> None:
        import mmap
        self.size = size
        self.fd = os.memfd_create("vhostd-test-log", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size + slack)
        self.map = mmap.mmap(self.fd, size + slack)

    def native(self) -> NativeLog:
        return NativeLog(self.fd, self.size, 0)

    def pages(self) -> set[int]:
        """The pages whose bits are set (within the declared size)."""
        out: set[int] = set()
        for i, b in enumerate(self.map[: self.size]):
            if b:
                out.update(i * 8 + k for k in range(8) if b >> k & 1)
        return out

    def take(self) -> set[int]:
        """Pages set, then clears them (what QEMU's log sync does)."""
        p = self.pages()
        self.map[: self.size] = bytes(self.size)
        return p

    def beyond_is_clean(self) -> bool:
        return not any(self.map[self.size:])

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def pages_of(gpa: int, length: int) -> set[int]:
    return set(range(gpa >> 12, ((gpa + length - 1) >> 12) + 1)) if length else set()


class GuardedRam(GuestRam):
    """GuestRam whose regions sit inside bigger memfds, ``guard`` bytes of
    a known pattern before and after each region (the C side maps the
    memfd from 0 and uses mmap_offset=guard, so the leading guard is mapped
    in the back-end too).  ``guard_intact()`` checks nobody wrote there."""

    GUARD_BYTE = 0xA5

    def __init__(self, region_sizes: list[int], base: int = RAM_BASE, guard: int = 4096) -> None:
        import mmap
        self.guard = guard
        self.regions = []
        self.full_maps: list[mmap.mmap] = []
        gpa = base
        for size in region_sizes:
            fd = os.memfd_create("vhostd-test-guarded", os.MFD_CLOEXEC)
            os.ftruncate(fd, guard + size + guard)
            full = mmap.mmap(fd, guard + size + guard)
            full[:] = bytes([self.GUARD_BYTE]) * len(full)
            full[guard: guard + size] = bytes(size)
            self.full_maps.append(full)
            self.regions.append(RamRegion(gpa, size, fd, mmap.mmap(fd, size, offset=guard)))
            gpa += size
        self.end = gpa
        self._next = base

    def guard_intact(self) -> bool:
        g = bytes([self.GUARD_BYTE]) * self.guard
        for full, r in zip(self.full_maps, self.regions):
            if full[: self.guard] != g or full[self.guard + r.size:] != g:
                return False
        return True

    def mem_offset(self) -> int:
        return self.guard

    def close(self) -> None:
        for m in self.full_maps:
            m.close()
        super().close()


@dataclass
class Req:
    head: int
    status_gpa: int
    in_gpa: int = 0
    read_len: int = 0


# conftest's loop_device fixture: content -> (/dev/loopN, its backing file).
LoopFactory = Callable[[bytes], tuple[str, Path]]


class Rig:
    """One virtio-blk ring processed in this thread by the C code."""

    def __init__(self, workdir: Path, *, region_sizes: tuple[int, ...] = (1 << 16, 1 << 16),
                 num: int = 16, event_idx: bool = False, indirect: bool = True,
                 sectors: int = 256, readonly: bool = False, serial: bytes = b"SER123",
                 last_avail_idx: int | None = None, guarded: bool = False, packed: bool = False) -> None:
        self.ram: GuestRam = GuardedRam(list(region_sizes)) if guarded else GuestRam(list(region_sizes))
        offset = self.ram.mem_offset() if guarded else 0  # type: ignore[attr-defined]
        self.mem = MemTable()
        for r in self.ram.regions:
            self.mem.add(r.fd, r.gpa, r.size, r.uva, offset)
        self.num = num
        self.packed = packed
        self.ring = make_ring(self.ram, 0, num, event_idx, packed)
        self.event_idx = event_idx
        self.indirect = indirect
        self.sectors = sectors
        self.image = workdir / "disk.img"
        self.initial = pattern(sectors * SECTOR)
        self.image.write_bytes(self.initial)
        self.fd = os.open(self.image, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        self.blk = NativeBlk(self.fd, sectors, readonly, serial)
        self.vring = NativeVring()
        self.setup(last_avail_idx)

    def setup(self, last_avail_idx: int | None = None, log: NativeLog | None = None,
              log_used_gpa: int | None = None, used_base: int | None = None,
              inflight: Any = None) -> None:
        """last_avail_idx / used_base: default a new ring's (packed: wrap counters 1)."""
        ram, ring = self.ram, self.ring
        base = ring.initial_base
        self.vring.setup(self.mem, num=self.num, desc=ram.gpa_to_uva(ring.desc),
                         avail=ram.gpa_to_uva(ring.avail), used=ram.gpa_to_uva(ring.used),
                         last_avail_idx=base & 0xFFFF if last_avail_idx is None else last_avail_idx,
                         event_idx=self.event_idx,
                         indirect=self.indirect, call_fd=ring.call_fd, err_fd=ring.err_fd,
                         log=log, log_used_gpa=log_used_gpa, packed=self.packed,
                         used_base=base >> 16 if used_base is None else used_base,
                         inflight=ffi.NULL if inflight is None else inflight)

    # --- driving --------------------------------------------------------------

    def process(self) -> int:
        return self.vring.process(NativeBlk.kind, self.blk.ptr)

    def process_uring(self, depth: int = 8, timeout: float = 10.0) -> None:
        """One pass of the io_uring engine, then waits until everything it
        submitted completed and was published (what a stopping worker does)."""
        q = NativeBlkQueue(self.blk, depth)
        try:
            self.vring.process(NativeBlkQueue.kind, q.ptr)
            deadline = time.monotonic() + timeout
            while lib.vhd_blk_queue_quiesce(q.ptr, self.vring.ptr) > 0:
                assert time.monotonic() < deadline, "io_uring requests never completed"
                time.sleep(0.001)
        finally:
            q.close()

    def pop(self) -> int:
        """One raw vhd_vring_pop(); returns its result code."""
        chain = ffi.new("struct vhd_chain *")
        return int(lib.vhd_vring_pop(self.vring.ptr, chain))

    @property
    def broken(self) -> int:
        return self.vring.stats().broken

    def file(self) -> bytes:
        return self.image.read_bytes()

    def calls(self) -> int:
        return eventfd_count(self.ring.call_fd)

    def errors(self) -> int:
        return eventfd_count(self.ring.err_fd)

    # --- building requests ------------------------------------------------------

    def alloc(self, data: bytes | int, align: int = 16) -> int:
        size = data if isinstance(data, int) else len(data)
        gpa = self.ram.alloc(size, align)
        self.ram.write(gpa, bytes(size) if isinstance(data, int) else data)
        return gpa

    def header(self, type_: int, sector: int, ioprio: int = 0) -> int:
        return self.alloc(struct.pack("<IIQ", type_, ioprio, sector))

    def status(self) -> int:
        return self.alloc(b"\xff", 1)

    def request(self, type_: int, sector: int, data: bytes = b"", read_len: int = 0,
                indirect: bool = False, split_header: bool = False) -> Req:
        h = self.header(type_, sector)
        bufs = [Buf(h, 8), Buf(h + 8, 8)] if split_header else [Buf(h, 16)]
        if data:
            bufs.append(Buf(self.alloc(data, 512), len(data)))
        in_gpa = 0
        if read_len:
            in_gpa = self.alloc(read_len, 512)
            bufs.append(Buf(in_gpa, read_len, writable=True))
        st = self.status()
        bufs.append(Buf(st, 1, writable=True))
        head = self.ring.submit(bufs, indirect)
        return Req(head, st, in_gpa, read_len)

    def read_req(self, sector: int, length: int, indirect: bool = False, split_header: bool = False) -> Req:
        return self.request(VIRTIO_BLK_T_IN, sector, read_len=length, indirect=indirect, split_header=split_header)

    def write_req(self, sector: int, data: bytes, **kw: bool) -> Req:
        return self.request(VIRTIO_BLK_T_OUT, sector, data=data, **kw)

    def status_of(self, req: Req) -> int:
        return self.ram.read(req.status_gpa, 1)[0]

    def data_of(self, req: Req) -> bytes:
        return self.ram.read(req.in_gpa, req.read_len)

    def close(self) -> None:
        self.vring.close()
        self.blk.close()
        self.mem.close()
        os.close(self.fd)
        self.ring.close()
        self.ram.close()


# --- the daemon subprocess ---------------------------------------------------

class Daemon:
    """``vhostd blk`` in a subprocess; stderr (the log) goes to a file."""

    def __init__(self, *, size: int = 1 << 20, num_queues: int = 1, read_only: bool = False,
                 serial: str = "SER123", name: str = "blk0") -> None:
        # Socket paths are limited to 108 bytes: not under pytest's long tmp_path.
        self.dir = Path(tempfile.mkdtemp(prefix="vhd-"))
        self.name = name
        self.image = self.dir / "disk.img"
        self.image.write_bytes(pattern(size, seed=1))
        self.sock = self.dir / "s.sock"
        self.log_path = self.dir / "vhostd.log"
        self._log = open(self.log_path, "wb")
        args = [sys.executable, "-m", "vhostd", "--log-level", "info", "blk",
                "--socket-path", str(self.sock), "--file", str(self.image),
                "--num-queues", str(num_queues), "--serial", serial, "--name", name]
        if read_only:
            args.append("--read-only")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.wait_log(f"{name}: listening on", timeout=10)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self, level: str | None = None) -> list[str]:
        out = self.log().splitlines()
        return [ln for ln in out if f" {level} " in ln] if level else out

    def wait_log(self, needle: str, timeout: float = 5.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(needle) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"vhostd exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not logged {count} times:\n{self.log()}")
            time.sleep(0.01)

    def connect(self, timeout: float = 5.0) -> Frontend:
        """Connects, retrying while a previous session is still being torn
        down (the daemon refuses a second front-end until then)."""
        deadline = time.monotonic() + timeout
        while True:
            fe = Frontend(str(self.sock))
            try:
                fe.call(Request.GET_QUEUE_NUM)
                return fe
            except (ConnectionError, OSError):
                fe.close()
                if time.monotonic() > deadline or not self.alive:
                    raise
                time.sleep(0.01)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def memfd_maps(self) -> int:
        with open(f"/proc/{self.pid}/maps") as f:
            return sum(1 for ln in f if "memfd:" in ln)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        self._log.close()
        return rc

    def cleanup(self) -> None:
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.search(r"\bERROR\b", ln)]


@dataclass
class Attached:
    """A negotiated front-end with memory and one started ring per queue."""

    fe: Frontend
    ram: GuestRam
    rings: list[DriverRing]
    features: int
    protocol_features: int

    @property
    def ring(self) -> DriverRing:
        return self.rings[0]

    def blk(self, i: int = 0) -> BlkDriver:
        return BlkDriver(self.rings[i])

    def close(self) -> None:
        self.fe.close()
        for r in self.rings:
            r.close()
        self.ram.close()


def attach(daemon: Daemon, *, want: int = ~0, protocol_want: int = ~0, queues: int = 1,
           num: int = 64, event_idx: bool | None = None, enable: bool = True,
           ram_sizes: tuple[int, ...] = (1 << 20, 1 << 20), packed: bool = False) -> Attached:
    """packed: negotiate VIRTIO_F_RING_PACKED and lay out packed rings."""
    from vhostd.protocol.constants import VirtioFeature, bit
    fe = daemon.connect()
    features, proto = fe.negotiate(want, protocol_want, packed=packed)
    ram = GuestRam(list(ram_sizes))
    fe.set_mem_table(ram)
    if event_idx is None:
        event_idx = bool(features & bit(VirtioFeature.RING_EVENT_IDX))
    with_pf = bool(features & bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES))
    rings = []
    for i in range(queues):
        ring = make_ring(ram, i, num, event_idx=event_idx, packed=packed)
        fe.start_ring(ring, enable=enable, protocol_features=with_pf)
        rings.append(ring)
    return Attached(fe, ram, rings, features, proto)


def socket_closed(sock: socket.socket, timeout: float = 3.0) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            if sock.recv(4096) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
