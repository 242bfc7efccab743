"""One front-end connection driving one device (vhost-user.rst).

The session owns everything the front-end set up: negotiated features,
guest memory and the rings.  It knows the device only through
``vhostd.devices.base.Device``.  Protocol violations raise
``ProtocolError`` and end the session; ``DeviceError`` fails just that
request (acked with an error when REPLY_ACK asked for it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from vhostd.devices.base import Device, DeviceError
from vhostd.fds import OwnedFd, close_all
from vhostd.memory import GuestMemory, GuestMemoryError, GuestRegion, InflightBuffer
from vhostd.protocol.backend import BackendChannel, BackendChannelError, BackendRequest
from vhostd.protocol.channel import Channel, Disconnected
from vhostd.protocol.constants import (
    MAX_QUEUE_SIZE,
    feature_names,
    ProtocolFeature,
    Request,
    VirtioFeature,
    bit,
)
from vhostd.protocol.messages import (
    SPECS,
    Config,
    Inflight,
    LogBase,
    MemRegMsg,
    MemTable,
    Message,
    ProtocolError,
    U64,
    VringAddr,
    VringState,
    encode_reply,
    vring_index_of,
)
from vhostd.native import MAX_MEM_SLOTS, NativeError, NativeLog
from vhostd.scheduler import Scheduler
from vhostd.vring import VHOST_VRING_F_LOG, Vring, VringError

log = logging.getLogger("vhostd.session")

@dataclass(frozen=True)
class Reply:
    """A reply payload that carries fds (GET_INFLIGHT_FD)."""

    payload: bytes
    fds: tuple[OwnedFd, ...] = ()


Handler = Callable[[Message], Awaitable[bytes | Reply | None]]
# A removed region is unmapped once no other REM_MEM_REG came for this long,
# at the next ADD_MEM_REG, or before any other request: QEMU re-sends a
# region that changed shape as REM then ADD, and the guest may use that
# memory all along (an added region is usable as soon as it is acknowledged).
MEMORY_SETTLE_S = 0.02


class RequestFailed(Exception):
    """The request is refused (a REPLY_ACK failure); the connection stays."""


class Session:
    def __init__(self, device: Device, channel: Channel, scheduler: Scheduler) -> None:
        self.device = device
        self.channel = channel
        self.scheduler = scheduler
        self.features = 0            # acked virtio features (SET_FEATURES)
        self.protocol_features = 0   # acked protocol features
        self.mem: GuestMemory | None = None
        # ADD/REM_MEM_REG not yet handed to the workers: the table to install,
        # the regions to unmap after it, and when to install it at the latest.
        self._mem_next: GuestMemory | None = None
        self._mem_gone: list[GuestRegion] = []
        # QEMU's vhost-user-net sends every region once per queue pair on the
        # one connection (a vhost_dev each): identical ADDs are counted, and
        # a region goes with its last REM.  Key: (gpa, size, uva).
        self._mem_refs: dict[tuple[int, int, int], int] = {}
        self._mem_deadline = 0.0
        self._lock = trio.Lock()          # one request, or the memory settling, at a time
        self._nursery: trio.Nursery | None = None
        self.inflight: InflightBuffer | None = None
        self.backend: BackendChannel | None = None   # SET_BACKEND_REQ_FD: our requests to the front-end
        self.log: NativeLog | None = None   # SET_LOG_BASE's bitmap, used while LOG_ALL is on
        self.log_pages = 0                   # pages logged in logs already released
        self.closing = False
        self.closed = trio.Event()
        # Workers signal this when the guest breaks a ring (logged) or changes
        # device state the control plane applies (net control queue).
        self._broken = OwnedFd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        self.vrings = [Vring(i) for i in range(device.num_queues)]
        self._handlers: dict[Request, Handler] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_LOG_BASE: self._set_log_base,
            Request.SET_LOG_FD: self._set_log_fd,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.NET_SET_MTU: self._net_set_mtu,
            Request.SEND_RARP: self._send_rarp,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
        }
        assert set(self._handlers) == set(SPECS), "every accepted request needs a handler"

    # --- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        """Serves messages until the front-end disconnects or misbehaves."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._report_broken_rings)
                await self._serve_messages()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):   # workers must be joined even on shutdown
                await self.close()

    async def _serve_messages(self) -> None:
        try:
            while True:
                try:
                    msg = await self.channel.recv()
                except Disconnected:
                    log.info("%s: front-end disconnected", self.device.name)
                    return
                await self._dispatch(msg)
        except ProtocolError as e:
            log.error("%s: closing connection: %s", self.device.name, e)
        except ConnectionError as e:   # EPIPE/ECONNRESET: the front-end left mid-exchange
            log.warning("%s: connection lost: %s", self.device.name, e)

    async def _report_broken_rings(self) -> None:
        reported: set[int] = set()
        while True:
            await trio.lowlevel.wait_readable(self._broken.fileno())
            os.eventfd_read(self._broken.fileno())
            self.device.on_event()
            for vr in self.vrings:
                reason = vr.stats().broken_reason
                if not reason:
                    reported.discard(vr.index)   # re-initialised by the front-end
                elif vr.index not in reported:
                    reported.add(vr.index)
                    log.warning("%s: ring %d: guest error, ring stopped (device needs reset): %s",
                                self.device.name, vr.index, reason)

    async def close(self) -> None:
        self.closing = True
        for vr in self.vrings:
            await vr.stop()
        for vr in self.vrings:
            vr.close()
        self._drop_memory()
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self._release_log()
        if self.backend is not None:
            self.backend.close()
        self._broken.close()
        self.device.on_disconnect()
        self.closed.set()

    async def _dispatch(self, msg: Message) -> None:
        async with self._lock:
            await self._dispatch_locked(msg)

    async def _dispatch_locked(self, msg: Message) -> None:
        log.debug("%s: %s %s fds=%d", self.device.name, msg.request.spec_name, msg.payload, len(msg.fds))
        try:
            if msg.request is not Request.REM_MEM_REG:
                await self._apply_memory()
            reply = await self._handlers[msg.request](msg)
            status = 0
        except (DeviceError, RequestFailed) as e:
            log.warning("%s: %s failed: %s", self.device.name, msg.request.spec_name, e)
            reply, status = None, 1
        except ProtocolError as e:
            if e.request is None:   # e.g. a ring that cannot start: name the request that started it
                raise ProtocolError(msg.request, e.reason) from None
            raise
        finally:
            for fd in msg.fds:   # a handler that keeps an fd removes it from msg.fds
                fd.close()
        if SPECS[msg.request].reply is not None:
            if reply is None:
                raise ProtocolError(msg.request, "no reply could be produced")
            if isinstance(reply, Reply):
                try:
                    await self.channel.send(encode_reply(msg.request, reply.payload),
                                            [fd.fileno() for fd in reply.fds])
                finally:
                    close_all(reply.fds)
            else:
                await self.channel.send(encode_reply(msg.request, reply))
        elif msg.need_reply and self.protocol_features & bit(ProtocolFeature.REPLY_ACK):
            await self.channel.send(encode_reply(msg.request, U64(status).pack()))

    # --- helpers -----------------------------------------------------------

    def _has_feature(self, f: VirtioFeature) -> bool:
        return bool(self.features & bit(f))

    def _vring(self, request: Request, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(request, f"ring index {index} out of range (device has {len(self.vrings)})")
        return self.vrings[index]

    def _start_if_ready(self, vr: Vring, memory_may_come: bool = False) -> None:
        """memory_may_come: a ring outside guest memory waits (its region
        was removed and may be added back) instead of being an error."""
        if vr.running or not vr.can_run(self.mem):
            return
        assert self.mem is not None
        if self.inflight is not None and vr.index < self.inflight.num_queues \
                and vr.num > self.inflight.queue_size:
            raise ProtocolError(None, f"ring {vr.index}: size {vr.num} exceeds the inflight buffer's "
                                      f"queue size {self.inflight.queue_size}")
        if self.inflight is not None and self.inflight.packed != self._packed:
            raise ProtocolError(None, f"ring {vr.index}: the inflight buffer has the "
                                      f"{'packed' if self.inflight.packed else 'split'} layout, the ring not")
        resubmitted = vr.stats().resubmitted
        try:
            vr.start(self.mem, self.device.queue_backend(vr.index), self.scheduler, owner=self.device.name,
                     event_idx=self._has_feature(VirtioFeature.RING_EVENT_IDX),
                     indirect=self._has_feature(VirtioFeature.RING_INDIRECT_DESC),
                     options=self.device.workers, broken_fd=self._broken.fileno(),
                     inflight=self.inflight.region(vr.index) if self.inflight else None,
                     log=self.log if self._logging else None, packed=self._packed,
                     qos=self.device.qos)
        except VringError as e:
            if memory_may_come and e.outside_memory:
                log.warning("%s: %s; the ring waits for its memory", self.device.name, e)
                return
            raise ProtocolError(None, str(e)) from None
        log.info("%s: ring %d started (%s, size %d, base %d, %s)", self.device.name, vr.index, vr.layout, vr.num,
                 vr.native.base,
                 "own thread" if vr.worker is not None and vr.worker < 0 else f"worker {vr.worker}")
        if (n := vr.stats().resubmitted - resubmitted) > 0:
            log.info("%s: ring %d: resubmitting %d requests that were in flight", self.device.name, vr.index, n)

    async def _restart(self, vr: Vring) -> None:
        """Stop and start again so the worker picks up changed state."""
        if vr.running:
            await vr.stop()
            self._start_if_ready(vr)

    @property
    def _packed(self) -> bool:
        return self._has_feature(VirtioFeature.RING_PACKED)

    @property
    def _logging(self) -> bool:
        return self._has_feature(VirtioFeature.LOG_ALL) and self.log is not None

    def _release_log(self) -> None:
        """Unmaps the dirty log; no running ring may use it."""
        if self.log is not None:
            assert not any(vr.running for vr in self.vrings) or not self._logging
            self.log_pages += self.log.stats().pages
            self.log.close()
            self.log = None

    # --- features and ownership ---------------------------------------------

    async def _get_features(self, msg: Message) -> bytes:
        return U64(self.device.features()).pack()

    async def _set_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        offered = self.device.features()
        if msg.payload.value & ~offered:
            raise ProtocolError(msg.request, f"features {msg.payload.value & ~offered:#x} were not offered")
        # Workers read feature-dependent state (header sizes, EVENT_IDX):
        # none may run while it changes.
        running = [vr for vr in self.vrings if vr.running]
        for vr in running:
            await vr.stop()
        was_logging = self._logging
        self.features = msg.payload.value
        if was_logging != self._has_feature(VirtioFeature.LOG_ALL):
            log.info("%s: dirty page logging %s", self.device.name,
                     "on" if self._has_feature(VirtioFeature.LOG_ALL) else "off")
        if was_logging and not self._logging:
            # Migration done or cancelled: QEMU drops its log without a new
            # SET_LOG_BASE.  The rings are stopped, nothing uses it.
            self._release_log()
        if not self._has_feature(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES):
            # Without protocol features rings start enabled (vhost-user.rst).
            for vr in self.vrings:
                vr.enabled = True
        try:
            self.device.on_features(self.features)
        except DeviceError as e:
            raise ProtocolError(msg.request, str(e)) from None
        for vr in self.vrings:
            self._start_if_ready(vr)
        return None

    async def _set_owner(self, msg: Message) -> None:
        return None

    async def _reset_owner(self, msg: Message) -> None:
        for vr in self.vrings:
            await vr.stop()
            vr.close()
        self.vrings = [Vring(i) for i in range(self.device.num_queues)]
        self.features = 0
        return None

    async def _get_protocol_features(self, msg: Message) -> bytes:
        return U64(self.device.protocol_features()).pack()

    async def _set_protocol_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        offered = self.device.protocol_features()
        if msg.payload.value & ~offered:
            raise ProtocolError(msg.request, f"protocol features {msg.payload.value & ~offered:#x} were not offered")
        self.protocol_features = msg.payload.value
        return None

    async def _get_queue_num(self, msg: Message) -> bytes:
        return U64(self.device.queue_num).pack()

    async def _get_max_mem_slots(self, msg: Message) -> bytes:
        return U64(MAX_MEM_SLOTS).pack()

    # --- memory ----------------------------------------------------------

    async def _set_mem_table(self, msg: Message) -> None:
        assert isinstance(msg.payload, MemTable)
        fds, msg.fds = msg.fds, []     # GuestMemory takes and closes them
        try:
            mem = GuestMemory.from_table(msg.payload.regions, fds)
        except GuestMemoryError as e:
            raise ProtocolError(msg.request, str(e)) from None
        running = [vr for vr in self.vrings if vr.running]
        for vr in running:
            await vr.stop()
        old, self.mem = self.mem, mem
        if old is not None:
            old.close()
            old.unmap()
        self._mem_refs = {}       # a whole table replaces what ADD_MEM_REG counted
        for vr in self.vrings:
            self._start_if_ready(vr)
        log.info("%s: memory table: %d regions, %d MiB", self.device.name, len(mem.regions), mem.size >> 20)
        return None

    def _memory_now(self) -> GuestMemory:
        """The table the next ADD/REM_MEM_REG starts from."""
        return self._mem_next or self.mem or GuestMemory(())

    def _stage_memory(self, new: GuestMemory) -> None:
        if self._mem_next is not None:
            self._mem_next.close()             # never installed: only its table goes
        self._mem_next = new
        self._mem_deadline = trio.current_time() + MEMORY_SETTLE_S
        if self._nursery is not None:
            self._nursery.start_soon(self._apply_memory_when_settled)

    async def _add_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, MemRegMsg)
        if not self.protocol_features & bit(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            raise ProtocolError(msg.request, "CONFIGURE_MEM_SLOTS was not negotiated")
        fd = msg.fds.pop()
        r = msg.payload.region
        key = (r.guest_phys_addr, r.memory_size, r.userspace_addr)
        if key in self._mem_refs:
            fd.close()
            self._mem_refs[key] += 1          # the same region again, from another queue pair
            return None
        base = self._memory_now()
        try:
            new, region = base.with_region(msg.payload.region, fd)   # mapped now, outside any stop
        except GuestMemoryError as e:
            raise ProtocolError(msg.request, str(e)) from None
        finally:
            if base is not self._mem_next and base is not self.mem:
                base.close()
        self._stage_memory(new)
        self._mem_refs[key] = 1
        log.info("%s: memory region added: gpa %#x, %d MiB", self.device.name,
                 region.desc.guest_phys_addr, region.desc.memory_size >> 20)
        await self._apply_memory()          # usable once acknowledged
        return None

    async def _rem_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, MemRegMsg)
        if not self.protocol_features & bit(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            raise ProtocolError(msg.request, "CONFIGURE_MEM_SLOTS was not negotiated")
        r = msg.payload.region
        key = (r.guest_phys_addr, r.memory_size, r.userspace_addr)
        if self._mem_refs.get(key, 0) > 1:
            self._mem_refs[key] -= 1          # another queue pair still has it
            return None
        base = self._memory_now()
        try:
            new, region = base.without(msg.payload.region)
        except GuestMemoryError as e:
            # vhost-user.rst names no outcome: refuse the request (REPLY_ACK), keep the connection.
            raise RequestFailed(str(e)) from None
        finally:
            if base is not self._mem_next and base is not self.mem:
                base.close()
        self._mem_refs.pop(key, None)
        self._mem_gone.append(region)
        self._stage_memory(new)
        log.info("%s: memory region removed: gpa %#x, %d MiB", self.device.name,
                 region.desc.guest_phys_addr, region.desc.memory_size >> 20)
        return None

    async def _apply_memory_when_settled(self) -> None:
        while self._mem_next is not None:
            if trio.current_time() < self._mem_deadline:
                await trio.sleep_until(self._mem_deadline)
                continue
            async with self._lock:
                try:
                    await self._apply_memory()
                except ProtocolError as e:
                    log.error("%s: closing connection: %s", self.device.name, e)
                    assert self._nursery is not None
                    self._nursery.cancel_scope.cancel()   # the session ends, as for a bad message
            return

    async def _apply_memory(self) -> None:
        """Installs the staged table.  Added regions reach running rings
        between two turns of their workers; a removed region first stops the
        rings (requests in flight may use it), then is unmapped."""
        new, gone = self._mem_next, self._mem_gone
        if new is None:
            return
        self._mem_next, self._mem_gone = None, []
        old, running = self.mem, [vr for vr in self.vrings if vr.running]
        if gone:
            for vr in running:
                await vr.stop()
        self.mem = new
        for vr in running if not gone else ():
            if not await vr.swap_memory(new):
                await vr.stop()
        for vr in self.vrings:
            self._start_if_ready(vr, memory_may_come=True)
        if old is not None:
            old.close()
        for region in gone:
            region.unmap()
        log.info("%s: memory: %d regions, %d MiB", self.device.name, len(new.regions), new.size >> 20)

    def _drop_memory(self) -> None:
        """Frees every table and unmaps every region (no ring runs)."""
        mapped: dict[int, GuestRegion] = {}
        for mem in (self.mem, self._mem_next):
            if mem is not None:
                mem.close()
                mapped.update((id(g), g) for g in mem.regions)
        mapped.update((id(g), g) for g in self._mem_gone)
        for g in mapped.values():
            g.unmap()
        self.mem = self._mem_next = None
        self._mem_gone = []

    # --- dirty page log (live migration) ------------------------------------

    async def _set_log_base(self, msg: Message) -> bytes:
        """Maps the new bitmap and moves the rings to it: each is stopped
        (its writes in flight are logged to the old bitmap) and restarted
        on the new one before the reply, so no write goes unlogged; QEMU
        reads the old bitmap after our reply and then frees it."""
        assert isinstance(msg.payload, LogBase)
        p = msg.payload
        if not self.protocol_features & bit(ProtocolFeature.LOG_SHMFD):
            raise ProtocolError(msg.request, "LOG_SHMFD was not negotiated")
        if p.mmap_size == 0:
            raise ProtocolError(msg.request, "log of 0 bytes")
        fd = msg.fds[0]
        try:
            new = NativeLog(fd.fileno(), p.mmap_size, p.mmap_offset)
        except NativeError as e:
            raise ProtocolError(msg.request, f"dirty log: {e.strerror}") from None
        if os.environ.get("VHOSTD_TEST_DROP_DIRTY_LOG") == "1":   # tests/test_guest_migration.py
            if new.set_drop(True):
                log.warning("%s: VHOSTD_TEST_DROP_DIRTY_LOG: the dirty log records nothing", self.device.name)
            else:
                log.error("%s: VHOSTD_TEST_DROP_DIRTY_LOG ignored: not a test build", self.device.name)
        if self.mem is not None and (need := NativeLog.size_for(self.mem.gpa_end)) > p.mmap_size:
            log.warning("%s: %s: log of %d bytes covers less guest memory than the table's %d MiB "
                        "(needs %d): writes past it are not logged (front-end error)", self.device.name,
                        msg.request.spec_name, p.mmap_size, self.mem.gpa_end >> 20, need)
        running = [vr for vr in self.vrings if vr.running] if self._logging else []
        for vr in running:
            await vr.stop()
        self._release_log()
        self.log = new
        for vr in running:
            self._start_if_ready(vr)
        log.info("%s: dirty log of %d KiB (covers %d MiB of guest memory)", self.device.name,
                 p.mmap_size >> 10, p.mmap_size * 8 * 4096 >> 20)
        return U64(0).pack()

    async def _set_log_fd(self, msg: Message) -> None:
        # QEMU never sends it with LOG_SHMFD; the fd is closed by _dispatch.
        return None

    # --- rings -----------------------------------------------------------

    def _stopped_vring(self, msg: Message, index: int) -> Vring:
        vr = self._vring(msg.request, index)
        if vr.running:
            raise ProtocolError(msg.request, f"ring {index} is running")
        return vr

    async def _set_vring_num(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vr = self._stopped_vring(msg, msg.payload.index)
        n = msg.payload.num
        if n == 0 or n > MAX_QUEUE_SIZE or (n & (n - 1) and not self._packed):
            raise ProtocolError(msg.request, f"ring {vr.index}: size {n} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        vr.num = n
        return None

    async def _set_vring_addr(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringAddr)
        vr = self._vring(msg.request, msg.payload.index)
        if msg.payload.flags & ~VHOST_VRING_F_LOG:
            raise ProtocolError(msg.request, f"ring {vr.index}: unknown flags {msg.payload.flags:#x}")
        vr.addr = msg.payload
        await self._restart(vr)
        self._start_if_ready(vr)
        return None

    async def _set_vring_base(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vr = self._stopped_vring(msg, msg.payload.index)
        # Packed rings: both positions with their wrap counters (32 bits).
        if msg.payload.num > 0xFFFF and not self._packed:
            raise ProtocolError(msg.request, f"ring {vr.index}: base {msg.payload.num} does not fit 16 bits")
        vr.last_avail_idx = msg.payload.num
        return None

    async def _get_vring_base(self, msg: Message) -> bytes:
        assert isinstance(msg.payload, VringState)
        vr = self._vring(msg.request, msg.payload.index)
        await vr.stop()
        vr.started = False
        log.info("%s: ring %d stopped at %d", self.device.name, vr.index, vr.last_avail_idx)
        return VringState(vr.index, vr.last_avail_idx).pack()

    def _vring_fd(self, msg: Message) -> tuple[Vring, OwnedFd | None]:
        assert isinstance(msg.payload, U64)
        try:
            index, nofd = vring_index_of(msg.payload)
        except ValueError as e:
            raise ProtocolError(msg.request, str(e)) from None
        vr = self._vring(msg.request, index)
        return vr, (None if nofd else msg.fds.pop())

    async def _set_vring_kick(self, msg: Message) -> None:
        vr, fd = self._vring_fd(msg)
        await vr.stop()
        old, vr.kick = vr.kick, fd
        if old is not None:
            old.close()
        vr.started = True   # no fd: the front-end wants the ring polled
        self._start_if_ready(vr)
        return None

    async def _set_vring_call(self, msg: Message) -> None:
        vr, fd = self._vring_fd(msg)
        running = vr.running
        await vr.stop()     # the worker must not signal an fd we are closing
        old, vr.call = vr.call, fd
        if old is not None:
            old.close()
        if running:
            self._start_if_ready(vr)
        return None

    async def _set_vring_err(self, msg: Message) -> None:
        vr, fd = self._vring_fd(msg)
        running = vr.running
        await vr.stop()
        old, vr.err = vr.err, fd
        if old is not None:
            old.close()
        if running:
            self._start_if_ready(vr)
        return None

    async def _set_vring_enable(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vr = self._vring(msg.request, msg.payload.index)
        # QEMU enables rings before SET_FEATURES: what counts is that the
        # feature was offered (and so protocol features are in use).
        if not self.device.features() & bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES):
            raise ProtocolError(msg.request, "sent without VHOST_USER_F_PROTOCOL_FEATURES")
        if msg.payload.num not in (0, 1):
            raise ProtocolError(msg.request, f"ring {vr.index}: enable value {msg.payload.num} is not 0 or 1")
        vr.enabled = bool(msg.payload.num)
        if vr.enabled:
            self._start_if_ready(vr)
        else:
            await vr.stop()
        return None

    # --- config space ------------------------------------------------------

    async def _get_config(self, msg: Message) -> bytes:
        assert isinstance(msg.payload, Config)
        c = msg.payload
        return Config(c.offset, c.size, c.flags, self.device.read_config(c.offset, c.size)).pack()

    async def _set_config(self, msg: Message) -> None:
        assert isinstance(msg.payload, Config)
        self.device.write_config(msg.payload.offset, msg.payload.data)
        return None

    # --- the back-end channel ---------------------------------------------------

    async def _set_backend_req_fd(self, msg: Message) -> None:
        if not self.protocol_features & bit(ProtocolFeature.BACKEND_REQ):
            raise ProtocolError(msg.request, "BACKEND_REQ was not negotiated")
        fd = msg.fds.pop()
        if self.backend is not None:
            self.backend.close()
        try:
            self.backend = BackendChannel(fd, reply_ack=bool(self.protocol_features & bit(ProtocolFeature.REPLY_ACK)))
        except OSError as e:
            fd.close()
            raise ProtocolError(msg.request, f"not a socket: {e.strerror}") from None
        return None

    async def config_changed(self) -> str:
        """Tells the front-end that config space changed (a resize), through
        the back-end channel.  Runs beside the message loop, which must keep
        answering (QEMU reads the new config before it answers this).
        Returns what happened, for the operator."""
        if self.backend is None or self.backend.closed:
            return "the front-end gave no back-end channel: the guest sees it after a device reset"
        try:
            await self.backend.request(BackendRequest.CONFIG_CHANGE_MSG)
        except BackendChannelError as e:
            log.warning("%s: config change not delivered: %s", self.device.name, e)
            return f"the front-end was not told: {e}"
        return "the front-end was told"

    # --- net ---------------------------------------------------------------

    async def _net_set_mtu(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        self.device.set_mtu(msg.payload.value)
        return None

    async def _send_rarp(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        self.device.send_rarp(msg.payload.value.to_bytes(8, "little")[:6])
        return None

    # --- inflight I/O tracking ------------------------------------------------

    def _check_inflight(self, msg: Message) -> Inflight:
        assert isinstance(msg.payload, Inflight)
        p = msg.payload
        if not self.protocol_features & bit(ProtocolFeature.INFLIGHT_SHMFD):
            raise ProtocolError(msg.request, "INFLIGHT_SHMFD was not negotiated")
        if not 1 <= p.num_queues <= len(self.vrings):
            raise ProtocolError(msg.request, f"{p.num_queues} queues, device has {len(self.vrings)}")
        if not 1 <= p.queue_size <= MAX_QUEUE_SIZE:
            raise ProtocolError(msg.request, f"queue size {p.queue_size} not in 1..{MAX_QUEUE_SIZE}")
        if any(vr.running for vr in self.vrings):
            raise ProtocolError(msg.request, "rings are running")
        return p

    async def _get_inflight_fd(self, msg: Message) -> Reply:
        p = self._check_inflight(msg)
        buf, fd = InflightBuffer.create(p.num_queues, p.queue_size, self._packed)
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = buf
        log.info("%s: inflight buffer for %d queues of %d", self.device.name, p.num_queues, p.queue_size)
        return Reply(Inflight(buf.mmap_size, 0, p.num_queues, p.queue_size).pack(), (fd,))

    async def _set_inflight_fd(self, msg: Message) -> None:
        p = self._check_inflight(msg)
        fd = msg.fds.pop()
        try:
            buf = InflightBuffer(fd, p.mmap_size, p.mmap_offset, p.num_queues, p.queue_size, self._packed)
        except GuestMemoryError as e:
            raise ProtocolError(msg.request, str(e)) from None
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = buf
        log.info("%s: inflight buffer restored (%d queues of %d)", self.device.name, p.num_queues, p.queue_size)
        return None

    # --- status ---------------------------------------------------------------

    def log_status(self) -> dict[str, Any]:
        st = self.log.stats() if self.log is not None else None
        return {
            "enabled": self._logging,
            "size": self.log.size if self.log is not None else 0,
            "pages": self.log_pages + (st.pages if st else 0),
            "refused": st.refused if st else 0,
        }

    def status(self) -> dict[str, Any]:
        """What `vhostd status` shows for the front-end and each ring (counters
        are read from the workers without locks: they may be a batch old)."""
        rings = []
        for vr in self.vrings:
            st = vr.stats()
            rings.append({
                "index": vr.index, "size": vr.num, "enabled": vr.enabled, "running": vr.running,
                "layout": "packed" if self._packed else "split",
                "worker": vr.worker,
                "last_avail_idx": vr.native.base if vr.running else vr.last_avail_idx,
                "requests": st.requests, "bytes_read": st.bytes_read, "bytes_written": st.bytes_written,
                "errors": st.errors, "kicks": st.kicks, "calls": st.calls, "batches": st.batches,
                "resubmitted": st.resubmitted, "broken": st.broken_reason,
            })
        return {
            "features": self.device.feature_names(self.features),
            "protocol_features": feature_names(self.protocol_features, ProtocolFeature),
            "memory_mib": (self.mem.size >> 20) if self.mem else 0,
            "memory_regions": len(self.mem.regions) if self.mem else 0,
            "inflight_tracking": self.inflight is not None,
            "dirty_log": self.log_status(),
            "rings": rings,
        }
