"""Verified I/O on many devices at once, from one Python thread (the scaling tests).

A ``Load`` is one front-end (``vhostd.frontend``) attached to one device, with a fixed set
of request slots per ring allocated once in its guest RAM.  ``step()`` never blocks: it
takes what the device completed, checks it, and puts the slot back to work.  A ``Driver``
steps many loads in a loop (in a thread of its own) until stopped, so that every device has
requests in flight at the same time.

What is verified:

- blk: each slot owns a set of 4 KiB blocks no other slot touches.  It writes a block with a
  pattern naming (device, block, generation), then reads it back and compares, then moves to
  its next block.  Status must be OK and the used length right.
- net (null back-end): every TX frame comes back exactly once, with its own descriptor; every
  RX buffer comes back holding the null back-end's frame for *this* device (its MAC), with a
  12-byte header saying one buffer, and nothing past it.

Failures are collected in ``Load.errors`` (the test asserts there are none) rather than
raised in the driver thread.
"""

from __future__ import annotations

import os
import select
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vhostd.frontend import Buf, DriverRing, Frontend, GuestRam
from vhostd.protocol.constants import ProtocolFeature, VirtioFeature, bit

PROTO = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
FEATURES = bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
BLOCK = 4096
NET_HDR = 12
NULL_FRAME = 60
RX_BUF = 2048
RX_FILL = 0xA5


def mac_of(index: int) -> bytes:
    return bytes([0x52, 0x54, 0x00, 0x5C, index >> 8 & 0xFF, index & 0xFF])


def mac_str(index: int) -> str:
    return ":".join(f"{b:02x}" for b in mac_of(index))


def blk_pattern(dev: int, block: int, gen: int) -> bytes:
    return struct.pack("<IIII", dev, block, gen, 0x5CA1AB1E) * (BLOCK // 16)


@dataclass
class Slot:
    """One request a ring keeps in flight: its buffers in guest RAM, and what it does next."""

    hdr: int
    data: int
    status: int
    blocks: list[int] = field(default_factory=list)   # blk: the blocks it owns
    pos: int = 0
    gen: int = 0
    writing: bool = True
    seq: int = 0                                      # net TX: frame number


class Load:
    """One device driven by a front-end: ``qd`` requests in flight per ring."""

    def __init__(self, sock: Path, kind: str, index: int, *, queues: int = 1, qd: int = 4,
                 disk_blocks: int = 256, ring_size: int = 64, connect_timeout: float = 10.0) -> None:
        self.kind, self.index, self.sock = kind, index, sock
        self.errors: list[str] = []
        self.completed = 0
        self.last_progress = time.monotonic()
        self.max_gap = 0.0          # longest time without a completion while stepping
        ring_size = max(ring_size, 1 << (3 * qd - 1).bit_length())   # a blk request: 3 descriptors
        self.fe = _connect(sock, connect_timeout)
        self.fe.negotiate(FEATURES, PROTO)
        nrings = 2 * queues if kind == "net" else queues
        need = nrings * (qd * (BLOCK + 64 + RX_BUF) + 16 * ring_size + 8 * ring_size + 64) + (64 << 10)
        self.ram = GuestRam([max(1 << 20, 1 << (need - 1).bit_length())])
        self.fe.set_mem_table(self.ram)
        self.rings = [DriverRing(self.ram, i, ring_size) for i in range(nrings)]
        for r in self.rings:
            self.fe.start_ring(r)
        self.slots: list[list[Slot]] = []
        self.inflight: list[dict[int, Slot]] = [{} for _ in self.rings]
        if kind == "blk":
            nslots = queues * qd
            for q in range(queues):
                slots = []
                for k in range(qd):
                    s = self._slot(BLOCK)
                    first = q * qd + k
                    s.blocks = list(range(first, disk_blocks, nslots))
                    slots.append(s)
                self.slots.append(slots)
        else:
            for q in range(nrings):
                self.slots.append([self._slot(RX_BUF if q % 2 == 0 else NET_HDR + NULL_FRAME)
                                   for _ in range(qd)])
        self.expected_rx = (bytes(10) + struct.pack("<H", 1)
                            + (b"\xff" * 6 + mac_of(index) + b"\x88\xb5").ljust(NULL_FRAME, b"\0"))
        for q, slots in enumerate(self.slots):
            for s in slots:
                self._submit(q, s)
            self.rings[q].kick()

    def _slot(self, data_len: int) -> Slot:
        return Slot(hdr=self.ram.alloc(16), data=self.ram.alloc(data_len, 512),
                    status=self.ram.alloc(1, 1))

    # --- requests ------------------------------------------------------------------

    def _submit(self, q: int, s: Slot) -> None:
        ring = self.rings[q]
        if self.kind == "blk":
            block = s.blocks[s.pos]
            sector = block * (BLOCK // 512)
            self.ram.write(s.status, b"\xff")
            if s.writing:
                self.ram.write(s.hdr, struct.pack("<IIQ", 1, 0, sector))
                self.ram.write(s.data, blk_pattern(self.index, block, s.gen))
                bufs = [Buf(s.hdr, 16), Buf(s.data, BLOCK), Buf(s.status, 1, writable=True)]
            else:
                self.ram.write(s.hdr, struct.pack("<IIQ", 0, 0, sector))
                self.ram.write(s.data, bytes(BLOCK))
                bufs = [Buf(s.hdr, 16), Buf(s.data, BLOCK, writable=True), Buf(s.status, 1, writable=True)]
        elif q % 2 == 0:   # net RX: an empty buffer, filled with a marker
            self.ram.write(s.data, bytes([RX_FILL]) * (NET_HDR + NULL_FRAME + 16))
            bufs = [Buf(s.data, RX_BUF, writable=True)]
        else:              # net TX: a frame naming device and sequence number
            s.seq += 1
            frame = (b"\xff" * 6 + mac_of(self.index) + b"\x88\xb6"
                     + struct.pack("<II", self.index, s.seq)).ljust(NULL_FRAME, b"\0")
            self.ram.write(s.data, bytes(NET_HDR) + frame)
            bufs = [Buf(s.data, NET_HDR + NULL_FRAME)]
        head = ring.submit(bufs)
        self.inflight[q][head] = s

    def _complete(self, q: int, s: Slot, used_len: int) -> None:
        if self.kind == "blk":
            block = s.blocks[s.pos]
            status = self.ram.read(s.status, 1)[0]
            what = f"{'write' if s.writing else 'read'} of block {block} gen {s.gen} (ring {q})"
            if status != 0:
                self._error(f"{what}: status {status}")
            if s.writing:
                if used_len != 1:
                    self._error(f"{what}: used length {used_len}, expected 1")
                s.writing = False
            else:
                if used_len != BLOCK + 1:
                    self._error(f"{what}: used length {used_len}, expected {BLOCK + 1}")
                got = self.ram.read(s.data, BLOCK)
                if got != blk_pattern(self.index, block, s.gen):
                    self._error(f"{what}: data differs from what was written: {_diff(got, blk_pattern(self.index, block, s.gen))}")
                s.writing = True
                s.pos += 1
                if s.pos == len(s.blocks):
                    s.pos, s.gen = 0, s.gen + 1
        elif q % 2 == 0:
            got = self.ram.read(s.data, NET_HDR + NULL_FRAME + 16)
            if used_len != NET_HDR + NULL_FRAME:
                self._error(f"rx (ring {q}): used length {used_len}, expected {NET_HDR + NULL_FRAME}")
            elif got[: NET_HDR + NULL_FRAME] != self.expected_rx:
                self._error(f"rx (ring {q}): not this device's null frame: {got[:NET_HDR + 14].hex()}")
            elif got[NET_HDR + NULL_FRAME:] != bytes([RX_FILL]) * 16:
                self._error(f"rx (ring {q}): written past the frame")
        elif used_len != 0:
            self._error(f"tx (ring {q}): used length {used_len}, expected 0")
        self.completed += 1

    def _error(self, what: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(f"{self.kind}{self.index}: {what}")

    def step(self) -> int:
        """Takes completions, checks them and resubmits; returns how many there were."""
        done = 0
        for q, ring in enumerate(self.rings):
            used = ring.take_used()
            if not used:
                continue
            for head, length in used:
                s = self.inflight[q].pop(head, None)
                if s is None:
                    self._error(f"ring {q}: used id {head} was not in flight (completed twice?)")
                    continue
                self._complete(q, s, length)
                self._submit(q, s)
            ring.kick()
            done += len(used)
        now = time.monotonic()
        if done:
            self.last_progress = now
        else:
            self.max_gap = max(self.max_gap, now - self.last_progress)
        return done

    def call_fds(self) -> list[int]:
        return [r.call_fd for r in self.rings]

    def close(self) -> None:
        self.fe.close()
        for r in self.rings:
            r.close()
        self.ram.close()


def _diff(got: bytes, want: bytes) -> str:
    first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    return (f"first difference at byte {first}: got {got[first:first + 16].hex()}, "
            f"expected {want[first:first + 16].hex()}")


def _connect(sock: Path, timeout: float) -> Frontend:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Frontend(str(sock))
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class Driver:
    """Steps a set of loads in a thread until ``stop()``; loads can be added and removed."""

    def __init__(self, loads: list[Load]) -> None:
        self.loads = list(loads)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scale-driver", daemon=True)
        self.failure: BaseException | None = None
        self.rounds = 0

    def start(self) -> Driver:
        now = time.monotonic()
        for ld in self.loads:
            ld.last_progress, ld.max_gap = now, 0.0
        self._thread.start()
        return self

    def _run(self) -> None:
        ep = select.epoll()
        watched: set[int] = set()
        try:
            while not self._stop.is_set():
                with self._lock:
                    loads = list(self.loads)
                    self.rounds += 1
                fds = {fd for ld in loads for fd in ld.call_fds()}
                for fd in fds - watched:
                    ep.register(fd, select.EPOLLIN)
                for fd in watched - fds:
                    ep.unregister(fd)
                watched = fds
                if sum(ld.step() for ld in loads) == 0:
                    for fd, _ in ep.poll(0.01):
                        try:
                            os.eventfd_read(fd)
                        except BlockingIOError:
                            pass
        except BaseException as e:   # reported by stop()
            self.failure = e
        finally:
            ep.close()

    def remove(self, load: Load) -> None:
        """Stops stepping load; returns once the driver no longer touches it (then close it)."""
        with self._lock:
            self.loads.remove(load)
            start = self.rounds
        while self._thread.is_alive():
            with self._lock:
                if self.rounds >= start + 2:
                    return
            time.sleep(0.001)

    def completed(self) -> dict[int, int]:
        return {ld.index: ld.completed for ld in self.loads}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the driver thread did not stop"
        if self.failure is not None:
            raise AssertionError(f"driver thread failed: {self.failure!r}") from self.failure


# --- a guest that floods one ring -------------------------------------------------------------


def flood(sock: Path, index: int, stop: threading.Event | None = None, ring_size: int = 256,
          pace_us: int = 0) -> None:
    """The fastest legal guest there is, on a null-net device's TX ring: every descriptor holds
    one frame, avail slot p always names head p % size, and the avail index is kept at
    used->idx + size, i.e. each head is offered again as soon as the device has used it.  The
    ring is never empty; the device always has work on it.  pace_us > 0: refill every pace_us
    and sleep in between (a ring that takes the device longer than that to empty still never
    runs dry, and the flooder takes almost no CPU).  Prints READY once the rings run, then
    floods until stop is set (or, run as a script, until stdin closes)."""
    fe = _connect(sock, 10.0)
    fe.negotiate(FEATURES, PROTO)
    ram = GuestRam([max(1 << 20, 64 * ring_size)])
    fe.set_mem_table(ram)
    rx, tx = DriverRing(ram, 0, ring_size), DriverRing(ram, 1, ring_size)
    frame = bytes(NET_HDR) + (b"\xff" * 6 + mac_of(index) + b"\x88\xb7").ljust(NULL_FRAME, b"\0")
    gpa = ram.alloc(len(frame))
    ram.write(gpa, frame)
    for head in range(ring_size):
        tx.write_desc(head, gpa, len(frame))
        ram.write(tx.avail + 4 + 2 * head, struct.pack("<H", head))
    fe.start_ring(rx)
    fe.start_ring(tx)
    print("READY", flush=True)
    region = ram.regions[0]
    used_off, avail_off = tx.used + 2 - region.gpa, tx.avail + 2 - region.gpa
    view = region.map
    # One aligned 16-bit load and store each (a 2-byte slice copy may tear: GuestRam.read_u16).
    with memoryview(view) as mv, mv[used_off: used_off + 2].cast("H") as used_idx, \
            mv[avail_off: avail_off + 2].cast("H") as avail_idx:
        _flood_loop(used_idx, avail_idx, tx.kick_fd, ring_size, stop, pace_us)
    fe.close()


def _flood_loop(used_idx: memoryview, avail_idx: memoryview, kick_fd: int, ring_size: int,
                stop: threading.Event | None, pace_us: int) -> None:
    if pace_us:
        import ctypes
        PR_SET_TIMERSLACK = 29   # wake up on time (default slack: 50 us)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    last = -1
    rounds = 0
    while stop is None or not stop.is_set():
        if pace_us:
            time.sleep(pace_us / 1e6)
        used = int(used_idx[0])
        avail_idx[0] = (used + ring_size) & 0xFFFF
        rounds += 1
        if used == last or rounds % 1024 == 0:
            os.eventfd_write(kick_fd, 1)   # the device may have gone to sleep: wake it
        last = used
        if stop is None and rounds % (256 if pace_us else 4096) == 0 and select.select([0], [], [], 0)[0]:
            if not os.read(0, 4096):
                break


if __name__ == "__main__":
    import sys
    if len(sys.argv) not in (4, 5, 6) or sys.argv[1] != "flood":
        sys.exit("usage: scale_load.py flood SOCKET INDEX [RING_SIZE [PACE_US]]")
    flood(Path(sys.argv[2]), int(sys.argv[3]), ring_size=int(sys.argv[4]) if len(sys.argv) > 4 else 256,
          pace_us=int(sys.argv[5]) if len(sys.argv) > 5 else 0)
