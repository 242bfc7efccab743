"""A small vhost-user front-end (driver side), in Python.

It plays QEMU's role without a VM: guest RAM in memfds, split or packed
rings laid out in it, the vhost-user negotiation over the socket, and a virtio-blk
driver on top.  The test suite drives vhostd with it, including rings
crafted to be hostile; ``vhostd probe`` and benchmarks can reuse it.
It is deliberately simple and synchronous.
"""

from __future__ import annotations

import array
import ctypes
import mmap
import os
import select
import socket
import struct
from dataclasses import dataclass, field

from vhostd.protocol.constants import HEADER_SIZE, HeaderFlag, Request, VirtioFeature, bit
from vhostd.protocol.messages import (
    Config,
    Header,
    MemRegion,
    MemRegMsg,
    MemTable,
    U64,
    VringAddr,
    VringState,
    encode_request,
)

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
VRING_PACKED_DESC_F_AVAIL = 1 << 7
VRING_PACKED_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_ENABLE, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_DESC = 0, 1, 2
PACKED_INITIAL_BASE = 0x8000_8000   # SET_VRING_BASE of a new packed ring: both wrap counters 1
PAGE = 4096


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


@dataclass
class RamRegion:
    gpa: int
    size: int
    fd: int
    map: mmap.mmap

    @property
    def uva(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self.map))


class GuestRam:
    """Guest physical memory: one memfd per region, regions back to back
    (so buffers can straddle two of them) starting at ``base``."""

    def __init__(self, region_sizes: list[int], base: int = 0x10_0000) -> None:
        self.regions: list[RamRegion] = []
        gpa = base
        for size in region_sizes:
            fd = os.memfd_create("vhostd-test-ram", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            self.regions.append(RamRegion(gpa, size, fd, mmap.mmap(fd, size)))
            gpa += size
        self.end = gpa
        self._next = base

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = _align(self._next, align)
        if gpa + size > self.end:
            raise MemoryError("test guest RAM exhausted")
        self._next = gpa + size
        return gpa

    def _locate(self, gpa: int) -> tuple[RamRegion, int]:
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r, gpa - r.gpa
        raise ValueError(f"gpa {gpa:#x} outside test RAM")

    def write(self, gpa: int, data: bytes) -> None:
        while data:
            r, off = self._locate(gpa)
            n = min(len(data), r.size - off)
            r.map[off: off + n] = data[:n]
            data, gpa = data[n:], gpa + n

    def read(self, gpa: int, length: int) -> bytes:
        out = bytearray()
        while length:
            r, off = self._locate(gpa)
            n = min(length, r.size - off)
            out += r.map[off: off + n]
            gpa, length = gpa + n, length - n
        return bytes(out)

    def read_u16(self, gpa: int) -> int:
        """A 16-bit field the device may be writing at this moment (a ring index), read with
        one aligned load.  read() copies with memcpy, which may load the two bytes separately
        (glibc's does for 2 bytes) and return a torn value, e.g. 0x01ff between 0x00ff and
        0x0100."""
        r, off = self._locate(gpa)
        if off % 2:
            raise ValueError(f"gpa {gpa:#x} is not 2-byte aligned")
        with memoryview(r.map) as mv, mv[off: off + 2] as b, b.cast("H") as h:
            return int(h[0])

    def gpa_to_uva(self, gpa: int) -> int:
        r, off = self._locate(gpa)
        return r.uva + off

    def mem_table(self) -> MemTable:
        return MemTable(tuple(MemRegion(r.gpa, r.size, r.uva, 0) for r in self.regions))

    def fds(self) -> list[int]:
        return [r.fd for r in self.regions]

    def close(self) -> None:
        for r in self.regions:
            try:
                r.map.close()
            except BufferError:
                pass   # a ctypes view still references it; the process exit unmaps
            os.close(r.fd)
        self.regions = []


@dataclass
class Buf:
    """One descriptor's buffer."""

    gpa: int
    len: int
    writable: bool = False


class DriverRing:
    """The driver's half of a split virtqueue laid out in GuestRam."""

    packed = False
    initial_base = 0

    def __init__(self, ram: GuestRam, index: int, num: int, event_idx: bool = False) -> None:
        self.ram, self.index, self.num = ram, index, num
        self.event_idx = event_idx
        self.desc = ram.alloc(16 * num, 16)
        self.avail = ram.alloc(6 + 2 * num, 2)
        self.used = ram.alloc(6 + 8 * num, 4)
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(num))
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.err_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.chains: dict[int, list[int]] = {}

    # Raw access, for crafting hostile rings.
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        self.ram.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, next))

    def push_avail(self, head: int) -> None:
        self.ram.write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.ram.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.ram.write(self.avail, struct.pack("<H", flags))

    def set_used_event(self, idx: int) -> None:
        self.ram.write(self.avail + 4 + 2 * self.num, struct.pack("<H", idx & 0xFFFF))

    # Fields the device writes: one aligned load each (GuestRam.read_u16), never torn.
    def used_idx(self) -> int:
        return self.ram.read_u16(self.used + 2)

    def used_flags(self) -> int:
        return self.ram.read_u16(self.used)

    def avail_event(self) -> int:
        return self.ram.read_u16(self.used + 4 + 8 * self.num)

    def add_chain(self, bufs: list[Buf], indirect: bool = False) -> int:
        """Puts a chain on the ring (not yet visible: call push_avail)."""
        if indirect:
            table = self.ram.alloc(16 * len(bufs), 16)
            for i, b in enumerate(bufs):
                flags = (VRING_DESC_F_WRITE if b.writable else 0) | (VRING_DESC_F_NEXT if i + 1 < len(bufs) else 0)
                self.ram.write(table + 16 * i, struct.pack("<QIHH", b.gpa, b.len, flags, i + 1))
            head = self.free.pop(0)
            self.write_desc(head, table, 16 * len(bufs), VRING_DESC_F_INDIRECT)
            self.chains[head] = [head]
            return head
        ids = [self.free.pop(0) for _ in bufs]
        for k, (i, b) in enumerate(zip(ids, bufs)):
            last = k + 1 == len(bufs)
            flags = (VRING_DESC_F_WRITE if b.writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            self.write_desc(i, b.gpa, b.len, flags, 0 if last else ids[k + 1])
        self.chains[ids[0]] = ids
        return ids[0]

    def submit(self, bufs: list[Buf], indirect: bool = False) -> int:
        head = self.add_chain(bufs, indirect)
        self.push_avail(head)
        return head

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    def take_used(self) -> list[tuple[int, int]]:
        """Used elements since last time, freeing their descriptors."""
        out = []
        end = self.used_idx()
        while self.last_used != end:
            slot = self.used + 4 + 8 * (self.last_used % self.num)
            id_, length = struct.unpack("<II", self.ram.read(slot, 8))
            out.append((id_, length))
            self.free.extend(self.chains.pop(id_, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def wait_used(self, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        deadline = _now() + timeout
        while len(got) < count:
            got += self.take_used()
            if len(got) >= count:
                break
            left = deadline - _now()
            if left <= 0:
                raise TimeoutError(f"ring {self.index}: {len(got)} of {count} completions")
            select.select([self.call_fd], [], [], min(left, 0.05))
            try:
                os.eventfd_read(self.call_fd)
            except BlockingIOError:
                pass
        return got

    def calls(self) -> int:
        try:
            return os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return 0

    def errors(self) -> int:
        try:
            return os.eventfd_read(self.err_fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd, self.err_fd):
            os.close(fd)


class PackedDriverRing(DriverRing):
    """The driver's half of a packed virtqueue (virtio 1.2 2.8) laid out in
    GuestRam, with DriverRing's interface: ``desc`` is the descriptor ring,
    ``avail`` the driver area and ``used`` the device area (what
    SET_VRING_ADDR carries), heads are buffer ids.  ``add_chain`` writes a
    chain with its head's flags held back; ``push_avail(id)`` stores them,
    which makes the chain available (in the order chains were added)."""

    packed = True
    initial_base = PACKED_INITIAL_BASE

    def __init__(self, ram: GuestRam, index: int, num: int, event_idx: bool = False) -> None:
        self.ram, self.index, self.num = ram, index, num
        self.event_idx = event_idx
        self.desc = ram.alloc(16 * num, 16)
        self.avail = ram.alloc(4, 4)      # driver event suppression
        self.used = ram.alloc(4, 4)       # device event suppression
        self.next_avail = 0               # ring position of the next descriptor we write
        self.avail_wrap = True
        self.last_used = 0                # ring position of the next used descriptor
        self.used_wrap = True
        self.avail_idx = 0                # chains made available (mod 2**16)
        self.n_used = 0                   # used descriptors taken (mod 2**16)
        self.free = list(range(num))      # buffer ids
        self.free_descs = num
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.err_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.chains: dict[int, list[int]] = {}        # id -> ring positions it took
        self._held: dict[int, tuple[int, int]] = {}    # id -> (head position, head flags)

    def _avail_bits(self, wrap: bool) -> int:
        return VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED

    # Raw access, for crafting hostile rings.
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, id: int = 0) -> None:  # noqa: A002
        self.ram.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, id, flags))

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) at ring position i."""
        addr, length, id_, flags = struct.unpack("<QIHH", self.ram.read(self.desc + 16 * i, 16))
        return addr, length, id_, flags

    def set_desc_flags(self, i: int, flags: int) -> None:
        self.ram.write(self.desc + 16 * i + 14, struct.pack("<H", flags))

    def avail_flags(self, wrap: bool | None = None) -> int:
        """AVAIL/USED bits that make a descriptor available in lap `wrap` (default: ours now)."""
        return self._avail_bits(self.avail_wrap if wrap is None else wrap)

    def _advance(self) -> None:
        self.next_avail += 1
        if self.next_avail == self.num:
            self.next_avail = 0
            self.avail_wrap = not self.avail_wrap

    def add_raw(self, descs: list[tuple[int, int, int, int]], wrap_bits: bool = True) -> int:
        """Writes descriptors (addr, len, flags, id) at the next positions, the
        AVAIL/USED bits added (wrap_bits) to all but the first, whose flags are
        held for push_avail.  Returns the position of the first."""
        head = self.next_avail
        head_flags = 0
        if descs:   # the driver side's record: the id of the last descriptor took these positions
            self.chains[descs[-1][3]] = [(head + k) % self.num for k in range(len(descs))]
        for k, (addr, length, flags, id_) in enumerate(descs):
            f = flags | (self._avail_bits(self.avail_wrap) if wrap_bits else 0)
            if k == 0:
                self.write_desc(self.next_avail, addr, length, 0 if self.avail_wrap else VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED, id_)
                head_flags = f
            else:
                self.write_desc(self.next_avail, addr, length, f, id_)
            self._advance()
        self._pending_head = (head, head_flags)
        return head

    def add_chain(self, bufs: list[Buf], indirect: bool = False) -> int:
        """Puts a chain on the ring (not yet visible: call push_avail)."""
        id_ = self.free.pop(0)
        if indirect:
            table = self.ram.alloc(16 * len(bufs), 16)
            for i, b in enumerate(bufs):
                self.ram.write(table + 16 * i, struct.pack("<QIHH", b.gpa, b.len, 0,
                                                           VRING_DESC_F_WRITE if b.writable else 0))
            descs = [(table, 16 * len(bufs), VRING_DESC_F_INDIRECT, id_)]
        else:
            descs = [(b.gpa, b.len, (VRING_DESC_F_WRITE if b.writable else 0)
                      | (VRING_DESC_F_NEXT if k + 1 < len(bufs) else 0), id_) for k, b in enumerate(bufs)]
        if len(descs) > self.free_descs:
            raise MemoryError("packed test ring full")
        self.free_descs -= len(descs)
        positions = [(self.next_avail + k) % self.num for k in range(len(descs))]
        self.add_raw(descs)
        self._held[id_] = self._pending_head
        self.chains[id_] = positions
        return id_

    def push_avail(self, head: int) -> None:
        """Makes the chain added as buffer id `head` available (its head's flags)."""
        pos, flags = self._held.pop(head)
        self.set_desc_flags(pos, flags)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def push_raw(self) -> None:
        """Makes the last add_raw() chain available."""
        pos, flags = self._pending_head
        self.set_desc_flags(pos, flags)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def set_driver_event(self, flags: int, off_wrap: int = 0) -> None:
        self.ram.write(self.avail, struct.pack("<HH", off_wrap, flags))

    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) of the device area."""
        off_wrap, flags = struct.unpack("<HH", self.ram.read(self.used, 4))
        return off_wrap, flags

    def _used_at(self, pos: int, wrap: bool) -> bool:
        flags = self.read_desc(pos)[3]
        a, u = bool(flags & VRING_PACKED_DESC_F_AVAIL), bool(flags & VRING_PACKED_DESC_F_USED)
        return a == u == wrap

    def used_idx(self) -> int:
        """Used descriptors the device has published, taken or not (mod 2**16):
        what a split ring's used->idx says."""
        n, pos, wrap = self.n_used, self.last_used, self.used_wrap
        for _ in range(self.num):
            if not self._used_at(pos, wrap):
                break
            id_ = self.read_desc(pos)[2]
            step = len(self.chains.get(id_, [0]))
            n += 1
            pos += step
            if pos >= self.num:
                pos, wrap = pos - self.num, not wrap
        return n & 0xFFFF

    def take_used(self) -> list[tuple[int, int]]:
        """Used descriptors since last time, freeing their ids."""
        out = []
        while self._used_at(self.last_used, self.used_wrap):
            _, length, id_, _ = self.read_desc(self.last_used)
            out.append((id_, length))
            positions = self.chains.pop(id_, [0])
            if id_ not in self.free and id_ < self.num:
                self.free.append(id_)
            self.free_descs += len(positions)
            self.last_used += len(positions)
            if self.last_used >= self.num:
                self.last_used -= self.num
                self.used_wrap = not self.used_wrap
            self.n_used = (self.n_used + 1) & 0xFFFF
        return out


def make_ring(ram: GuestRam, index: int, num: int, event_idx: bool = False, packed: bool = False) -> DriverRing:
    """A split or packed driver ring."""
    return (PackedDriverRing if packed else DriverRing)(ram, index, num, event_idx)


def _now() -> float:
    import time
    return time.monotonic()


class VhostUserError(Exception):
    pass


@dataclass
class Frontend:
    """The socket side: sends requests, reads replies."""

    path: str
    sock: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.path)

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([data], anc)

    def send(self, request: Request, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False) -> None:
        self.send_raw(encode_request(request, payload, need_reply), fds)

    def recv_reply(self, request: Request) -> bytes:
        hdr = Header.unpack(self._recv_exact(HEADER_SIZE))
        if hdr.request != request or not hdr.flags & HeaderFlag.REPLY:
            raise VhostUserError(f"unexpected reply {hdr} to {request.spec_name}")
        return self._recv_exact(hdr.size)

    def recv_reply_fds(self, request: Request) -> tuple[bytes, list[int]]:
        """A reply that carries fds (GET_INFLIGHT_FD)."""
        data, anc, _, _ = self.sock.recvmsg(HEADER_SIZE, socket.CMSG_SPACE(4 * 4))
        fds = [fd for level, kind, payload in anc
               if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
               for fd in array.array("i", payload[: len(payload) - len(payload) % 4])]
        data += self._recv_exact(HEADER_SIZE - len(data))
        hdr = Header.unpack(data)
        if hdr.request != request or not hdr.flags & HeaderFlag.REPLY:
            raise VhostUserError(f"unexpected reply {hdr} to {request.spec_name}")
        return self._recv_exact(hdr.size), fds

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("back-end closed the connection")
            buf += chunk
        return buf

    def call(self, request: Request, payload: bytes = b"", fds: list[int] | None = None) -> bytes:
        self.send(request, payload, fds)
        return self.recv_reply(request)

    def call_ack(self, request: Request, payload: bytes = b"", fds: list[int] | None = None) -> int:
        """Request with NEED_REPLY (REPLY_ACK negotiated): returns the ack status."""
        self.send(request, payload, fds, need_reply=True)
        return U64.unpack(self.recv_reply(request)).value

    def get_u64(self, request: Request) -> int:
        return U64.unpack(self.call(request)).value

    def is_closed(self, timeout: float = 2.0) -> bool:
        """True once the back-end has closed the connection."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(10)

    # --- the usual QEMU sequence ------------------------------------------

    def negotiate(self, want: int, protocol_want: int, packed: bool = False) -> tuple[int, int]:
        """Acks offered & want; VIRTIO_F_RING_PACKED only with packed (the
        rings are then PackedDriverRings): want=~0 means split rings."""
        offered = self.get_u64(Request.GET_FEATURES)
        features = offered & want
        if not packed:
            features &= ~bit(VirtioFeature.RING_PACKED)
        proto = 0
        if offered & bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES):
            proto = self.get_u64(Request.GET_PROTOCOL_FEATURES) & protocol_want
            self.send(Request.SET_PROTOCOL_FEATURES, U64(proto).pack())
        self.send(Request.SET_OWNER)
        self.send(Request.SET_FEATURES, U64(features).pack())
        return features, proto

    def set_mem_table(self, ram: GuestRam) -> None:
        self.send(Request.SET_MEM_TABLE, ram.mem_table().pack(), ram.fds())

    @staticmethod
    def _region(r: RamRegion) -> MemRegion:
        return MemRegion(r.gpa, r.size, r.uva, 0)

    def add_mem_reg(self, r: RamRegion) -> int:
        """VHOST_USER_ADD_MEM_REG (CONFIGURE_MEM_SLOTS, REPLY_ACK): the ack status."""
        return self.call_ack(Request.ADD_MEM_REG, MemRegMsg(self._region(r)).pack(), [r.fd])

    def rem_mem_reg(self, r: RamRegion) -> int:
        return self.call_ack(Request.REM_MEM_REG, MemRegMsg(self._region(r)).pack())

    def start_ring(self, ring: DriverRing, base: int | None = None, enable: bool = True,
                   protocol_features: bool = True) -> None:
        """SET_VRING_ADDR's three addresses are desc/used/avail for a split
        ring, descriptor ring/device area/driver area for a packed one."""
        ram = ring.ram
        self.send(Request.SET_VRING_NUM, VringState(ring.index, ring.num).pack())
        self.send(Request.SET_VRING_BASE, VringState(ring.index, ring.initial_base if base is None else base).pack())
        self.send(Request.SET_VRING_ADDR, VringAddr(
            ring.index, 0, ram.gpa_to_uva(ring.desc), ram.gpa_to_uva(ring.used),
            ram.gpa_to_uva(ring.avail), 0).pack())
        self.send(Request.SET_VRING_CALL, U64(ring.index).pack(), [ring.call_fd])
        self.send(Request.SET_VRING_ERR, U64(ring.index).pack(), [ring.err_fd])
        self.send(Request.SET_VRING_KICK, U64(ring.index).pack(), [ring.kick_fd])
        if enable and protocol_features:
            self.send(Request.SET_VRING_ENABLE, VringState(ring.index, 1).pack())

    def get_vring_base(self, index: int) -> int:
        return VringState.unpack(self.call(Request.GET_VRING_BASE, VringState(index, 0).pack())).num

    def get_config(self, size: int, offset: int = 0) -> bytes:
        return Config.unpack(self.call(Request.GET_CONFIG, Config(offset, size, 0, bytes(size)).pack())).data


# --- virtio-blk driver -------------------------------------------------------

VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID = 0, 1, 4, 8
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP = 0, 1, 2


@dataclass
class BlkResult:
    status: int
    used_len: int
    data: bytes = b""


class BlkDriver:
    """Issues virtio-blk requests on one DriverRing and waits for them."""

    def __init__(self, ring: DriverRing) -> None:
        self.ring = ring
        self.ram = ring.ram

    def request(self, type_: int, sector: int, data: bytes = b"", read_len: int = 0,
                indirect: bool = False, split_header: bool = False) -> BlkResult:
        head_gpa = self.ram.alloc(16)
        self.ram.write(head_gpa, struct.pack("<IIQ", type_, 0, sector))
        bufs = [Buf(head_gpa, 8), Buf(head_gpa + 8, 8)] if split_header else [Buf(head_gpa, 16)]
        if data:
            gpa = self.ram.alloc(len(data), 512)
            self.ram.write(gpa, data)
            bufs.append(Buf(gpa, len(data)))
        in_gpa = 0
        if read_len:
            in_gpa = self.ram.alloc(read_len, 512)
            self.ram.write(in_gpa, bytes(read_len))
            bufs.append(Buf(in_gpa, read_len, writable=True))
        status_gpa = self.ram.alloc(1, 1)
        self.ram.write(status_gpa, b"\xff")
        bufs.append(Buf(status_gpa, 1, writable=True))
        self.ring.submit(bufs, indirect)
        self.ring.kick()
        ((_, used_len),) = self.ring.wait_used(1)
        status = self.ram.read(status_gpa, 1)[0]
        return BlkResult(status, used_len, self.ram.read(in_gpa, read_len) if read_len else b"")

    def read(self, sector: int, length: int, indirect: bool = False,
             split_header: bool = False) -> BlkResult:
        return self.request(VIRTIO_BLK_T_IN, sector, read_len=length, indirect=indirect,
                            split_header=split_header)

    def write(self, sector: int, data: bytes, indirect: bool = False,
              split_header: bool = False) -> BlkResult:
        return self.request(VIRTIO_BLK_T_OUT, sector, data=data, indirect=indirect,
                            split_header=split_header)

    def flush(self) -> BlkResult:
        return self.request(VIRTIO_BLK_T_FLUSH, 0)

    def get_id(self) -> BlkResult:
        return self.request(VIRTIO_BLK_T_GET_ID, 0, read_len=20)


# --- virtio-net driver -------------------------------------------------------

class NetDriver:
    """A virtio-net queue pair: ``rx`` is ring 2i, ``tx`` ring 2i+1."""

    def __init__(self, rx: DriverRing, tx: DriverRing, hdr_len: int = 12) -> None:
        self.rx, self.tx, self.ram = rx, tx, rx.ram
        self.hdr_len = hdr_len
        self._rx_bufs: dict[int, int] = {}

    def send(self, frame: bytes, hdr: bytes | None = None) -> None:
        data = (hdr if hdr is not None else bytes(self.hdr_len)) + frame
        gpa = self.ram.alloc(len(data))
        self.ram.write(gpa, data)
        self.tx.submit([Buf(gpa, len(data))])
        self.tx.kick()

    def post_rx(self, count: int, size: int = 2048) -> None:
        for _ in range(count):
            gpa = self.ram.alloc(size)
            head = self.rx.submit([Buf(gpa, size, writable=True)])
            self._rx_bufs[head] = gpa
        self.rx.kick()

    def recv(self, count: int = 1, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
        """(header, frame) of received frames (single-buffer ones)."""
        out = []
        for head, length in self.rx.wait_used(count, timeout):
            data = self.ram.read(self._rx_bufs.pop(head), length)
            out.append((data[: self.hdr_len], data[self.hdr_len:]))
        return out
