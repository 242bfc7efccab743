"""One virtqueue's vhost-user state, and its native worker.

All the state the front-end set (SET_VRING_NUM/ADDR/BASE/KICK/CALL/ERR/
ENABLE) lives here in plain fields; the C ring (``NativeVring``) is set up
from it each time the ring starts, and gives back ``last_avail_idx`` when
it stops.  A ring runs iff it is started (a kick fd, or polling, was set),
enabled, and has memory, a size and addresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from vhostd.fds import OwnedFd, close_all
from vhostd.memory import GuestMemory
from vhostd.native import NativeError, NativeVring, VringStats, Worker, ffi
from vhostd.protocol.messages import VringAddr


@dataclass(frozen=True)
class QueueBackend:
    """What a ring's native worker runs: a ``VHD_DEV_*`` kind, the C device
    object, and for net RX the back-end fd to watch."""

    kind: int
    dev: Any
    backend_fd: int = -1


@dataclass(frozen=True)
class WorkerOptions:
    """How ring workers run: optional bounded busy-poll and CPU pinning."""

    poll_us: int = 0
    cpus: tuple[int, ...] = ()

    def cpu_for(self, ring: int) -> int:
        return self.cpus[ring % len(self.cpus)] if self.cpus else -1


class VringError(Exception):
    """The front-end configured a ring that cannot run (a protocol error)."""


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
    worker: Worker | None = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def can_run(self, mem: GuestMemory | None) -> bool:
        return self.started and self.enabled and mem is not None and self.num > 0 and self.addr is not None

    def start(self, mem: GuestMemory, backend: QueueBackend, *, event_idx: bool, indirect: bool,
              options: WorkerOptions = WorkerOptions(), broken_fd: int = -1,
              inflight: Any = None) -> None:
        assert self.addr is not None and self.worker is None
        try:
            self.native.setup(
                mem.table, num=self.num, desc=self.addr.desc_user_addr,
                avail=self.addr.avail_user_addr, used=self.addr.used_user_addr,
                last_avail_idx=self.last_avail_idx, event_idx=event_idx, indirect=indirect,
                call_fd=_fd_or_minus1(self.call), err_fd=_fd_or_minus1(self.err), broken_fd=broken_fd,
                inflight=ffi.NULL if inflight is None else inflight)
        except NativeError as e:
            raise VringError(
                f"ring {self.index}: size {self.num}, desc {self.addr.desc_user_addr:#x}, "
                f"avail {self.addr.avail_user_addr:#x}, used {self.addr.used_user_addr:#x}: "
                f"{'not inside guest memory' if e.errno == 14 else 'misaligned or bad size'}"
            ) from None
        try:
            self.worker = Worker(self.native, backend.kind, backend.dev, _fd_or_minus1(self.kick),
                                 backend.backend_fd, options.poll_us, options.cpu_for(self.index))
        except NativeError as e:   # e.g. a kick fd epoll cannot watch (a regular file)
            raise VringError(f"ring {self.index}: {e.strerror}") from None

    async def stop(self) -> None:
        """Joins the worker (off the event loop) and saves last_avail_idx."""
        worker, self.worker = self.worker, None
        if worker is not None:
            await trio.to_thread.run_sync(worker.stop)
            self.last_avail_idx = self.native.last_avail_idx

    def stats(self) -> VringStats:
        return self.native.stats()

    def close(self) -> None:
        """Releases fds and the C ring; the worker must be stopped."""
        assert self.worker is None
        close_all((self.kick, self.call, self.err))
        self.kick = self.call = self.err = None
        self.native.close()


def _fd_or_minus1(fd: OwnedFd | None) -> int:
    return -1 if fd is None else fd.fileno()
