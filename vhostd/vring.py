"""One virtqueue's vhost-user state, and its place on a native worker.

All the state the front-end set (SET_VRING_NUM/ADDR/BASE/KICK/CALL/ERR/
ENABLE) lives here in plain fields; the C ring (``NativeVring``) is set up
from it each time the ring starts, and gives back ``last_avail_idx`` when
it stops.  A ring runs iff it is started (a kick fd, or polling, was set),
enabled, and has memory, a size and addresses; running, it is a task on a
worker the ``Scheduler`` chose.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

import trio

from vhostd.fds import OwnedFd, close_all
from vhostd.memory import GuestMemory
from vhostd.native import NativeError, NativeLog, NativeVring, VringStats, ffi
from vhostd.protocol.messages import VringAddr
from vhostd.qos import DeviceQos
from vhostd.scheduler import Placement, Scheduler, SchedulerError


@dataclass(frozen=True)
class QueueBackend:
    """What a ring's native worker runs: a ``VHD_DEV_*`` kind, the C device
    object, for net RX and io_uring blk the back-end fd to watch,
    whether it blocks (then it gets a thread of its own), and which QoS
    classes its requests are (0: never limited, e.g. net's control queue)."""

    kind: int
    dev: Any
    backend_fd: int = -1
    exclusive: bool = False
    qos_classes: int = 0


@dataclass(frozen=True)
class WorkerOptions:
    """How a device's rings are scheduled: optional bounded busy-poll, and
    the CPUs whose workers may serve them (empty: any worker)."""

    poll_us: int = 0
    cpus: tuple[int, ...] = ()


VHOST_VRING_F_LOG = 0x1   # SET_VRING_ADDR flags: log used ring writes at log_guest_addr


class VringError(Exception):
    """The front-end configured a ring that cannot run (a protocol error)."""

    def __init__(self, reason: str, outside_memory: bool = False) -> None:
        super().__init__(reason)
        self.outside_memory = outside_memory   # may run once the region comes (back)


@dataclass
class Vring:
    index: int
    num: int = 0
    addr: VringAddr | None = None
    last_avail_idx: int = 0
    kick: OwnedFd | None = None
    call: OwnedFd | None = None
    err: OwnedFd | None = None
    started: bool = False
    enabled: bool = False
    native: NativeVring = field(default_factory=NativeVring)
    placement: Placement | None = None
    scheduler: Scheduler | None = None

    @property
    def running(self) -> bool:
        return self.placement is not None

    @property
    def worker(self) -> int | None:
        """The worker serving the ring (-2: a thread of its own), None when stopped."""
        return self.placement.worker if self.placement else None

    def can_run(self, mem: GuestMemory | None) -> bool:
        return self.started and self.enabled and mem is not None and self.num > 0 and self.addr is not None

    def start(self, mem: GuestMemory, backend: QueueBackend, scheduler: Scheduler, *, owner: str,
              event_idx: bool, indirect: bool, options: WorkerOptions = WorkerOptions(),
              broken_fd: int = -1, inflight: Any = None, log: NativeLog | None = None,
              packed: bool = False, qos: DeviceQos | None = None) -> None:
        """log: the dirty log while VHOST_F_LOG_ALL is on; used ring writes
        are logged too if SET_VRING_ADDR set VHOST_VRING_F_LOG.  packed:
        VIRTIO_F_RING_PACKED; the three addresses are then the descriptor
        ring, driver area and device area, and the base carries both
        positions (see ``packed_bases``).  qos: the device's limits, in force
        from the ring's first turn."""
        assert self.addr is not None and self.placement is None
        avail_base, used_base = packed_bases(self.last_avail_idx) if packed else (self.last_avail_idx, 0)
        try:
            self.native.setup(
                mem.table, num=self.num, desc=self.addr.desc_user_addr,
                avail=self.addr.avail_user_addr, used=self.addr.used_user_addr,
                last_avail_idx=avail_base, packed=packed, used_base=used_base,
                event_idx=event_idx, indirect=indirect,
                call_fd=_fd_or_minus1(self.call), err_fd=_fd_or_minus1(self.err), broken_fd=broken_fd,
                inflight=ffi.NULL if inflight is None else inflight, log=log,
                log_used_gpa=self.addr.log_guest_addr if self.addr.flags & VHOST_VRING_F_LOG else None)
        except NativeError as e:
            outside = e.errno == errno.EFAULT
            raise VringError(
                f"ring {self.index}: size {self.num}, desc {self.addr.desc_user_addr:#x}, "
                f"avail {self.addr.avail_user_addr:#x}, used {self.addr.used_user_addr:#x}: "
                f"{'not inside guest memory' if outside else 'misaligned, bad size or base'}", outside
            ) from None
        if qos is not None:
            qos.bind(self.native, self.index, backend.qos_classes)
        try:
            self.placement = scheduler.attach(
                self.native, owner=owner, kind=backend.kind, dev=backend.dev,
                kick_fd=_fd_or_minus1(self.kick), backend_fd=backend.backend_fd,
                poll_us=options.poll_us, cpus=options.cpus, exclusive=backend.exclusive)
        except NativeError as e:   # e.g. a kick fd epoll cannot watch (a regular file)
            raise VringError(f"ring {self.index}: {e.strerror}") from None
        except SchedulerError as e:
            raise VringError(f"ring {self.index}: {e}") from None
        self.scheduler = scheduler

    async def stop(self) -> None:
        """Detaches the ring from its worker (off the event loop: in-flight
        I/O completes first) and saves its base (GET_VRING_BASE's value)."""
        placement, self.placement = self.placement, None
        if placement is not None:
            assert self.scheduler is not None
            self.scheduler.release(placement)
            await trio.to_thread.run_sync(placement.detach)
            self.last_avail_idx = self.native.base

    @property
    def layout(self) -> str:
        return "packed" if self.native.packed else "split"

    async def swap_memory(self, mem: GuestMemory) -> bool:
        """Hands the running ring a new table between two of its worker's
        turns, without stopping it.  False if the ring no longer lies where
        it did in the new table (the caller restarts it)."""
        assert self.placement is not None
        return await trio.to_thread.run_sync(self.placement.task.set_mem, mem.table)

    def stats(self) -> VringStats:
        return self.native.stats()

    def close(self) -> None:
        """Releases fds and the C ring; the ring must be stopped."""
        assert self.placement is None
        close_all((self.kick, self.call, self.err))
        self.kick = self.call = self.err = None
        self.native.close()


def packed_bases(base: int) -> tuple[int, int]:
    """SET_VRING_BASE of a packed ring: the avail index in bits 0-14 and its
    wrap counter in bit 15, the used index and wrap counter in bits 16-31
    (vhost-user.rst).  DPDK's virtio-user sends only the low half (0x8000
    for a new ring, "no reservation"), as rings stop with nothing in flight;
    an empty high half then means the used position is the avail one."""
    avail, used = base & 0xFFFF, base >> 16
    if used == 0 and avail != 0:
        used = avail
    return avail, used


def _fd_or_minus1(fd: OwnedFd | None) -> int:
    return -1 if fd is None else fd.fileno()
