"""Thin typed layer over the cffi module ``vhostd._native``.

One error idiom: a negative errno from C becomes ``NativeError``.  Objects
own their C allocation and free it in ``close()``; the caller decides when
(workers must be stopped before the memory or ring they use is freed).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from vhostd._native import ffi, lib

__all__ = ["ffi", "lib", "MemTable", "NativeVring", "NativeScheduler", "Task", "NativeBlk", "NativeBlkQueue", "NativeNet", "NativeNetCtrl",
           "NativeError", "RegionMapping", "SharedMapping", "inflight_queue_size", "VringStats", "NetStats", "RING_ERRORS"]

MAX_MEM_SLOTS: int = lib.VHD_MAX_MEM_REGIONS   # regions in one table (CONFIGURE_MEM_SLOTS)
MAX_QUEUE_SIZE: int = lib.VHD_MAX_QUEUE_SIZE
MAX_IOV: int = lib.VHD_MAX_IOV
MAX_WORKERS: int = lib.VHD_MAX_WORKERS

# Names of vhd_vring_pop()'s guest errors, for logs and status.
RING_ERRORS: dict[int, str] = {
    lib.VHD_ERR_AVAIL_IDX: "avail idx moved by more than the ring size",
    lib.VHD_ERR_HEAD: "head index out of range",
    lib.VHD_ERR_NEXT: "desc.next out of range",
    lib.VHD_ERR_CHAIN_LEN: "descriptor chain longer than its table (loop)",
    lib.VHD_ERR_ADDR: "buffer outside guest memory",
    lib.VHD_ERR_INDIRECT: "bad indirect descriptor table",
    lib.VHD_ERR_ORDER: "device-readable descriptor after a device-writable one",
    lib.VHD_ERR_IOV: "chain has too many segments",
    lib.VHD_ERR_LEN: "chain length does not fit 32 bits",
    lib.VHD_ERR_LAYOUT: "used ring overlaps the avail ring or the descriptor table",
    lib.VHD_ERR_ID: "buffer id already in flight",
    lib.VHD_ERR_WRAP: "descriptor marked used in the driver's lap (wrap counter flipped)",
    lib.VHD_ERR_INFLIGHT: "inflight region inconsistent with the ring",
}


class NativeError(OSError):
    pass


def check(rc: int, what: str) -> int:
    if rc < 0:
        raise NativeError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


class MemTable:
    """``vhd_mem``: the guest memory translation table the C side uses."""

    def __init__(self) -> None:
        ptr = lib.vhd_mem_new()
        if ptr == ffi.NULL:
            raise NativeError(errno.ENOMEM, "vhd_mem_new")
        self.ptr: Any = ptr

    def add(self, fd: int, gpa: int, size: int, uva: int, mmap_offset: int) -> None:
        """Maps the region; the table owns the mapping."""
        check(lib.vhd_mem_add(self.ptr, fd, gpa, size, uva, mmap_offset), "mmap guest region")

    def add_mapped(self, gpa: int, size: int, uva: int, mapping: RegionMapping) -> None:
        """A region mapped by the caller, which keeps it mapped while the table lives."""
        check(lib.vhd_mem_add_mapped(self.ptr, gpa, size, uva, mapping.hva), "add guest region")

    def __len__(self) -> int:
        return int(lib.vhd_mem_count(self.ptr))

    def gpa_to_hva(self, gpa: int, length: int) -> int | None:
        p = lib.vhd_mem_gpa_to_hva(self.ptr, gpa, length)
        return None if p == ffi.NULL else int(ffi.cast("uintptr_t", p))

    def uva_to_hva(self, uva: int, length: int) -> int | None:
        p = lib.vhd_mem_uva_to_hva(self.ptr, uva, length)
        return None if p == ffi.NULL else int(ffi.cast("uintptr_t", p))

    def gpa_to_iov(self, gpa: int, length: int, max_iov: int = 16) -> list[tuple[int, int]]:
        iov = ffi.new("struct iovec[]", max_iov)
        n = check(lib.vhd_mem_gpa_to_iov(self.ptr, gpa, length, iov, max_iov), "translate")
        return [(int(ffi.cast("uintptr_t", iov[i].iov_base)), int(iov[i].iov_len)) for i in range(n)]

    def close(self) -> None:
        ptr, self.ptr = self.ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.vhd_mem_free(ptr)


class RegionMapping:
    """One guest memory region's mapping (``vhd_region_map``), shared by
    every table that holds the region: unmapped by close(), once no table
    a worker may use still has it.

    One mapping per file range for the whole process: the devices of one
    guest (a disk and a NIC, a NIC's queue pairs) are handed the same
    memfd on separate connections, and mapping it once per device
    multiplies the TLB footprint of the same memory (one front-end with 4
    ports on 4 devices cost the worker 3x per frame).  `open()` returns the
    existing mapping of (file, offset, size) with one more user; close()
    drops one.  Only the control plane (one thread) opens and closes."""

    _open: dict[tuple[int, int, int, int], RegionMapping] = {}

    def __init__(self, fd: int, size: int, mmap_offset: int) -> None:
        err = ffi.new("int *")
        base = lib.vhd_region_map(fd, size, mmap_offset, err)
        if base == ffi.NULL:
            why = "past the end of the file" if err[0] == -errno.ERANGE else os.strerror(-err[0])
            raise NativeError(-err[0], f"cannot map {size:#x} bytes at offset {mmap_offset:#x}: {why}")
        self.base: Any = base
        self.length = mmap_offset + size
        self.hva: Any = ffi.cast("char *", base) + mmap_offset
        self.users = 1
        self.key: tuple[int, int, int, int] | None = None

    @classmethod
    def open(cls, fd: int, size: int, mmap_offset: int, avoid: Collection[RegionMapping] = ()) -> RegionMapping:
        """The mapping of fd's range, shared unless it is one of `avoid` (the
        table's own: two regions of one table never share host addresses,
        which the dirty log's host-to-guest lookup needs)."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, mmap_offset, size)
        m = cls._open.get(key)
        if m is not None and m not in avoid:
            # The file is the same while the mapping lives (it holds the inode),
            # but its size may have shrunk: map anew rather than fault later.
            if st.st_size >= m.length:
                m.users += 1
                return m
        m = cls(fd, size, mmap_offset)
        if key not in cls._open:
            m.key = key
            cls._open[key] = m
        return m

    def close(self) -> None:
        if self.base == ffi.NULL:
            return
        self.users -= 1
        if self.users > 0:
            return
        if self.key is not None and self._open.get(self.key) is self:
            del self._open[self.key]
        base, self.base = self.base, ffi.NULL
        lib.vhd_unmap(base, self.length)


def inflight_queue_size(queue_size: int, packed: bool = False) -> int:
    """Bytes of one ring's inflight region: split or packed layout (vhost-user.rst)."""
    if packed:
        return int(lib.vhd_inflight_queue_size_packed(queue_size))
    return int(lib.vhd_inflight_queue_size(queue_size))


class SharedMapping:
    """A MAP_SHARED mapping of an fd (the inflight buffer)."""

    def __init__(self, fd: int, size: int, offset: int = 0) -> None:
        err = ffi.new("int *")
        ptr = lib.vhd_map_shared(fd, size, offset, err)
        if ptr == ffi.NULL:
            why = "past the end of the file" if err[0] == -errno.ERANGE else os.strerror(-err[0])
            raise NativeError(-err[0], f"cannot map {size} bytes at offset {offset}: {why}")
        self.ptr: Any = ptr
        self.size = size

    def at(self, offset: int) -> Any:
        assert 0 <= offset < self.size
        return ffi.cast("char *", self.ptr) + offset

    def close(self) -> None:
        ptr, self.ptr = self.ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.vhd_unmap(ptr, self.size)


@dataclass(frozen=True)
class LogStats:
    pages: int      # page bits set (a page written twice counts twice)
    refused: int    # pages past the end of the bitmap: the front-end's log is too small


class NativeLog:
    """The dirty-page bitmap of SET_LOG_BASE (one bit per 4 KiB page),
    mapped from the front-end's fd.  Rings keep a pointer to it: close it
    only after every ring using it stopped or switched to another."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        self.mapping = SharedMapping(fd, size, offset)
        self.size = size
        self.ptr: Any = lib.vhd_log_new(self.mapping.ptr, size)
        if self.ptr == ffi.NULL:
            self.mapping.close()
            raise MemoryError("dirty log")

    @staticmethod
    def size_for(gpa_end: int) -> int:
        """Bytes of bitmap that cover guest-physical addresses below gpa_end."""
        return int(lib.vhd_log_size_for(gpa_end))

    def set_drop(self, drop: bool) -> bool:
        """Test builds only: record nothing.  False if not compiled in."""
        return bool(lib.vhd_log_set_drop(self.ptr, int(drop)) == 0)

    def write(self, gpa: int, length: int) -> None:
        lib.vhd_log_write(self.ptr, gpa, length)

    def stats(self) -> LogStats:
        out = ffi.new("struct vhd_log_stats *")
        lib.vhd_log_stats_get(self.ptr, out)
        return LogStats(int(out.pages), int(out.refused))

    def close(self) -> None:
        ptr, self.ptr = self.ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.vhd_log_free(ptr)
            self.mapping.close()


@dataclass(frozen=True)
class VringStats:
    requests: int
    bytes_read: int
    bytes_written: int
    errors: int
    kicks: int
    calls: int
    batches: int
    broken: int
    resubmitted: int

    @property
    def broken_reason(self) -> str | None:
        return RING_ERRORS.get(self.broken, f"error {self.broken}") if self.broken else None


class NativeVring:
    """``vhd_vring``: one split virtqueue's device-side state."""

    def __init__(self) -> None:
        ptr = lib.vhd_vring_new()
        if ptr == ffi.NULL:
            raise NativeError(errno.ENOMEM, "vhd_vring_new")
        self.ptr: Any = ptr

    def setup(self, mem: MemTable, *, num: int, desc: int, avail: int, used: int,
              last_avail_idx: int, event_idx: bool, indirect: bool,
              call_fd: int, err_fd: int, broken_fd: int = -1, inflight: Any = ffi.NULL,
              log: NativeLog | None = None, log_used_gpa: int | None = None,
              packed: bool = False, used_base: int = 0) -> None:
        """log: VHOST_F_LOG_ALL is on; log_used_gpa: VHOST_VRING_F_LOG's
        log_guest_addr, where used ring writes are logged.  packed: desc,
        avail and used are the descriptor ring, driver area and device
        area; last_avail_idx and used_base carry a wrap counter in bit 15."""
        cfg = ffi.new("struct vhd_vring_config *", {
            "num": num, "desc_uva": desc, "avail_uva": avail, "used_uva": used,
            "last_avail_idx": last_avail_idx, "packed": int(packed), "used_base": used_base,
            "event_idx": int(event_idx),
            "indirect": int(indirect), "call_fd": call_fd, "err_fd": err_fd,
            "broken_fd": broken_fd, "inflight": inflight,
            "log": ffi.NULL if log is None else log.ptr,
            "log_used": int(log is not None and log_used_gpa is not None),
            "log_used_gpa": log_used_gpa or 0,
        })
        check(lib.vhd_vring_setup(self.ptr, mem.ptr, cfg), "vring setup")

    @property
    def last_avail_idx(self) -> int:
        return int(lib.vhd_vring_last_avail_idx(self.ptr))

    @property
    def used_idx(self) -> int:
        return int(lib.vhd_vring_used_idx(self.ptr))

    @property
    def base(self) -> int:
        """GET_VRING_BASE's value: split last_avail_idx, packed
        last_avail_idx | used_idx << 16 (each with its wrap counter in bit 15)."""
        return int(lib.vhd_vring_base(self.ptr))

    @property
    def packed(self) -> bool:
        return bool(lib.vhd_vring_is_packed(self.ptr))

    def stats(self) -> VringStats:
        s = lib.vhd_vring_stats(self.ptr)
        return VringStats(s.requests, s.bytes_read, s.bytes_written, s.errors,
                          s.kicks, s.calls, s.batches, s.broken, s.resubmitted)

    def set_qos(self, gate: QosGate | None, qos: NativeQos | None) -> None:
        """Limits the ring (stopped: after setup, before it runs) by qos
        through gate; None: unlimited."""
        lib.vhd_vring_set_qos(self.ptr, gate.ptr if gate else ffi.NULL, qos.ptr if qos else ffi.NULL)

    def process(self, dev_kind: int, dev: Any) -> int:
        """Drain the ring once in this thread (tests; workers do it natively)."""
        return int(lib.vhd_process_ring(self.ptr, dev_kind, dev))

    def close(self) -> None:
        ptr, self.ptr = self.ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.vhd_vring_free(ptr)


@dataclass(frozen=True)
class WorkerStats:
    wakeups: int
    runs: int
    polls: int
    rings: int


class NativeScheduler:
    """``vhd_sched``: the fixed set of native worker threads."""

    def __init__(self, workers: int, cpus: tuple[int, ...] = ()) -> None:
        err = ffi.new("int *")
        cpu_arr = ffi.new("int[]", list(cpus) or [0])
        ptr = lib.vhd_sched_new(workers, cpu_arr, len(cpus), err)
        if ptr == ffi.NULL:
            check(err[0], f"start {workers} ring workers")
        self.ptr: Any = ptr
        self.workers = workers

    def worker_stats(self, worker: int) -> WorkerStats:
        s = lib.vhd_sched_worker_stats(self.ptr, worker)
        return WorkerStats(s.wakeups, s.runs, s.polls, s.rings)

    def attach(self, vring: NativeVring, worker: int, dev_kind: int, dev: Any, kick_fd: int,
               backend_fd: int = -1, poll_us: int = 0) -> Task:
        err = ffi.new("int *")
        ptr = lib.vhd_task_attach(self.ptr, worker, vring.ptr, dev_kind, dev, kick_fd, backend_fd,
                                  poll_us * 1000, err)
        if ptr == ffi.NULL:
            check(err[0], "start ring")
        return Task(ptr)

    def close(self) -> None:
        """Joins the workers; every task must have been detached."""
        ptr, self.ptr = self.ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.vhd_sched_free(ptr)


EXCLUSIVE_WORKER: int = lib.VHD_WORKER_EXCLUSIVE


class Task:
    """``vhd_task``: one ring served by a worker."""

    def __init__(self, ptr: Any) -> None:
        self.ptr = ptr
        self.worker = int(lib.vhd_task_worker(ptr))

    def detach(self) -> None:
        """Waits until the worker lets go of the ring (blocks: call off the event loop)."""
        ptr, self.ptr = self.ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.vhd_task_detach(ptr)

    def set_mem(self, mem: MemTable) -> bool:
        """Hands the running ring a new table between two turns (blocks: call
        off the event loop).  False if the ring moved (restart it instead)."""
        return bool(lib.vhd_task_set_mem(self.ptr, mem.ptr) == 0)

    def set_qos(self, gate: QosGate, qos: NativeQos | None) -> None:
        """The running ring's limits, between two turns (blocks: call off the
        event loop).  Afterwards the worker no longer uses the old buckets."""
        lib.vhd_task_set_qos(self.ptr, gate.ptr, qos.ptr if qos else ffi.NULL)


class NativeBlk:
    """``vhd_blk``: request handling for one virtio-blk back-end file.
    As a worker's device it runs the synchronous engine."""

    kind: int = lib.VHD_DEV_BLK

    def __init__(self, fd: int, capacity_sectors: int, readonly: bool, serial: bytes,
                 buffered_fd: int = -1) -> None:
        ptr = lib.vhd_blk_new(fd, buffered_fd, capacity_sectors, int(readonly), serial, len(serial))
        if ptr == ffi.NULL:
            raise NativeError(errno.ENOMEM, "vhd_blk_new")
        self.ptr: Any = ptr

    def set_trim(self, *, discard: int, zeroes: int, may_unmap: bool, max_discard_sectors: int,
                 max_discard_seg: int, max_zeroes_sectors: int, max_zeroes_seg: int) -> None:
        """DISCARD / WRITE_ZEROES (before any worker runs)."""
        t = ffi.new("struct vhd_blk_trim *", {
            "discard": discard, "zeroes": zeroes, "may_unmap": int(may_unmap),
            "max_discard_sectors": max_discard_sectors, "max_discard_seg": max_discard_seg,
            "max_zeroes_sectors": max_zeroes_sectors, "max_zeroes_seg": max_zeroes_seg})
        lib.vhd_blk_set_trim(self.ptr, t)

    @property
    def capacity(self) -> int:
        return int(lib.vhd_blk_capacity(self.ptr))

    def set_capacity(self, sectors: int) -> None:
        lib.vhd_blk_set_capacity(self.ptr, sectors)

    def set_writethrough(self, on: bool) -> None:
        lib.vhd_blk_set_writethrough(self.ptr, int(on))

    def close(self) -> None:
        ptr, self.ptr = self.ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.vhd_blk_free(ptr)


class NativeBlkQueue:
    """``vhd_blk_queue``: the io_uring engine for one virtio-blk ring."""

    kind: int = lib.VHD_DEV_BLK_URING

    def __init__(self, blk: NativeBlk, depth: int) -> None:
        err = ffi.new("int *")
        ptr = lib.vhd_blk_queue_new(blk.ptr, depth, err)
        if ptr == ffi.NULL:
            check(err[0], "io_uring setup")
        self.ptr: Any = ptr

    @property
    def in_flight(self) -> int:
        return int(lib.vhd_blk_queue_inflight(self.ptr))

    @property
    def completion_fd(self) -> int:
        return int(lib.vhd_blk_queue_fd(self.ptr))

    def close(self) -> None:
        ptr, self.ptr = self.ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.vhd_blk_queue_free(ptr)


@dataclass(frozen=True)
class NetCtrlState:
    active_pairs: int
    generation: int
    rx_mode: int
    mac: bytes | None


class NativeNetCtrl:
    """``vhd_net_ctrl``: the virtio-net control virtqueue handler."""

    kind: int = lib.VHD_DEV_NET_CTRL

    def __init__(self, max_pairs: int) -> None:
        ptr = lib.vhd_net_ctrl_new(max_pairs)
        if ptr == ffi.NULL:
            raise NativeError(errno.ENOMEM, "vhd_net_ctrl_new")
        self.ptr: Any = ptr

    def state(self) -> NetCtrlState:
        s = lib.vhd_net_ctrl_state(self.ptr)
        return NetCtrlState(s.active_pairs, s.generation, s.rx_mode,
                            bytes(s.mac) if s.mac_set else None)

    def close(self) -> None:
        ptr, self.ptr = self.ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.vhd_net_ctrl_free(ptr)


@dataclass(frozen=True)
class NetStats:
    rx_frames: int
    rx_bytes: int
    rx_dropped: int
    rx_bad_desc: int
    tx_frames: int
    tx_bytes: int
    tx_dropped: int
    tx_bad_hdr: int


class NativeNet:
    """``vhd_net``: the data plane of one virtio-net queue pair."""

    RX: int = lib.VHD_DEV_NET_RX
    TX: int = lib.VHD_DEV_NET_TX

    def __init__(self, backend_fd: int) -> None:
        ptr = lib.vhd_net_new(backend_fd)
        if ptr == ffi.NULL:
            raise NativeError(errno.ENOMEM, "vhd_net_new")
        self.ptr: Any = ptr
        self.backend_fd = backend_fd

    def set_null_frame(self, frame: bytes) -> None:
        lib.vhd_net_set_null_frame(self.ptr, frame, len(frame))

    def configure(self, hdr_len: int, mrg_rxbuf: bool, tx_gso: int, backend_hdr: bool = True) -> None:
        """backend_hdr False: the tap was opened without IFF_VNET_HDR (no offloads)."""
        lib.vhd_net_configure(self.ptr, hdr_len, int(mrg_rxbuf), tx_gso, int(backend_hdr))

    def stats(self) -> NetStats:
        s = lib.vhd_net_stats(self.ptr)
        return NetStats(s.rx_frames, s.rx_bytes, s.rx_dropped, s.rx_bad_desc,
                        s.tx_frames, s.tx_bytes, s.tx_dropped, s.tx_bad_hdr)

    def close(self) -> None:
        ptr, self.ptr = self.ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.vhd_net_free(ptr)


# --- QoS (native/qos.c) -------------------------------------------------------

QOS_READ: int = lib.VHD_QOS_READ
QOS_WRITE: int = lib.VHD_QOS_WRITE
QOS_BYTES: int = lib.VHD_QOS_BYTES
QOS_OPS: int = lib.VHD_QOS_OPS
QOS_OPS_ONE: int = 1 << lib.VHD_QOS_OPS_SHIFT
QOS_MAX_RATE: int = lib.VHD_QOS_MAX_RATE
QOS_MAX_LENGTH: int = lib.VHD_QOS_MAX_LENGTH


@dataclass(frozen=True)
class QosLimit:
    """One bucket: ``classes`` (QOS_READ | QOS_WRITE) counted in ``unit``
    (QOS_BYTES / QOS_OPS) at ``avg`` per second, bursts of ``max`` per
    second for ``max_length`` seconds (QEMU's semantics)."""

    classes: int
    unit: int
    avg: int
    max: int = 0
    max_length: int = 0


class NativeQos:
    """``vhd_qos``: the buckets of a device or a group, shared by their rings.
    Free it only once no ring uses it (``Task.set_qos`` moved them all)."""

    def __init__(self, limits: list[QosLimit], op_size: int = 0, prev: NativeQos | None = None) -> None:
        arr = ffi.new("struct vhd_qos_limit[]", [
            {"classes": lim.classes, "unit": lim.unit, "avg": lim.avg, "max": lim.max,
             "max_length": lim.max_length} for lim in limits] or 1)
        err = ffi.new("int *")
        ptr = lib.vhd_qos_new(arr, len(limits), op_size, prev.ptr if prev else ffi.NULL, err)
        if ptr == ffi.NULL:
            check(err[0], "QoS limits")
        self.ptr: Any = ptr

    def admit(self, classes: int, now_ns: int) -> tuple[bool, int]:
        """(may a request of these classes go at now_ns, from when it may)."""
        until = ffi.new("uint64_t *")
        ok = bool(lib.vhd_qos_admit(self.ptr, classes, now_ns, until))
        return ok, int(until[0])

    def charge(self, cls: int, now_ns: int, nbytes: int = 0, ops: float = 1.0) -> None:
        lib.vhd_qos_charge(self.ptr, cls, nbytes, round(ops * QOS_OPS_ONE), now_ns)

    def op_cost(self, nbytes: int) -> float:
        return int(lib.vhd_qos_op_cost(self.ptr, nbytes)) / QOS_OPS_ONE

    def close(self) -> None:
        ptr, self.ptr = self.ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.vhd_qos_free(ptr)


def qos_clock() -> int:
    return int(lib.vhd_qos_clock())


def qos_set_fake_clock(ns: int) -> bool:
    """Test builds: vhd_qos_clock() returns ns (0: the real clock)."""
    return bool(lib.vhd_qos_set_fake_clock(ns) == 0)


@dataclass(frozen=True)
class GateStats:
    throttles: int
    throttled_ns: int     # including the current stretch, if throttled now


class QosGate:
    """``vhd_qos_gate``: one ring's access to its buckets, and its counters."""

    def __init__(self, classes: int, leasing: bool = False) -> None:
        ptr = lib.vhd_qos_gate_new(classes, int(leasing))
        if ptr == ffi.NULL:
            raise NativeError(errno.ENOMEM, "vhd_qos_gate_new")
        self.ptr: Any = ptr

    def stats(self, now_ns: int | None = None) -> GateStats:
        out = ffi.new("struct vhd_qos_gate_stats *")
        lib.vhd_qos_gate_stats(self.ptr, out)
        ns = int(out.throttled_ns)
        if out.throttled_since:
            now = qos_clock() if now_ns is None else now_ns
            ns += max(0, now - int(out.throttled_since))
        return GateStats(int(out.throttles), ns)

    def lease(self) -> int:
        """Requests let through before the next look at the buckets."""
        return int(lib.vhd_qos_gate_lease(self.ptr))

    def close(self) -> None:
        """Only while no ring uses it."""
        ptr, self.ptr = self.ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.vhd_qos_gate_free(ptr)
