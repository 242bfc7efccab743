#!/usr/bin/env python3
"""Writes the seed corpora (fuzz/corpus/TARGET/) and the known-bug
reproducers (fuzz/repro/TARGET/) of the libFuzzer targets.

The input formats are described at the top of each fuzz_*.c.  Seeds are
small well-formed and malformed cases the fuzzer mutates from: requests of
every kind, indirect tables, chains crossing the two regions, big rings,
memory at the top of the 64-bit space, and classic ring errors.

    python3 fuzz/gen_corpus.py          # rewrites both directories
    python3 fuzz/gen_corpus.py --check  # exit 1 if the files on disk are not what it writes
"""

from __future__ import annotations

import argparse
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = 4096
N, W, I = 1, 2, 4                      # VRING_DESC_F_NEXT, _WRITE, _INDIRECT
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8


def base_of(sel: int, total: int) -> int:
    """fuzz_common.h guest_base()."""
    return [0, 0x100000, 0x1_0000_0000 - total, (1 << 64) - total - PAGE][sel & 3]


def log2(n: int) -> int:
    return n.bit_length() - 1


@dataclass
class Ring:
    """A split ring at guest offset `at` in an Image."""

    num: int
    desc: int
    avail: int
    used: int
    last_avail: int = 0
    heads: list[int] = field(default_factory=list)
    avail_idx: int | None = None      # default: last_avail + len(heads)
    used_idx: int = 0

    @classmethod
    def at(cls, at: int, num: int, **kw: int) -> Ring:
        desc = at
        avail = desc + 16 * num
        used = (avail + 6 + 2 * num + 3) & ~3
        return cls(num, desc, avail, used, **kw)   # type: ignore[arg-type]

    def end(self) -> int:
        return self.used + 6 + 8 * self.num

    def header(self) -> bytes:
        idx = self.avail_idx if self.avail_idx is not None else self.last_avail + len(self.heads)
        return struct.pack("<6H", self.desc, self.avail, self.used, self.last_avail & 0xFFFF,
                           idx & 0xFFFF, self.used_idx & 0xFFFF)


class Image:
    """Guest memory contents from offset 0; gpa() turns offsets into addresses."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.buf = bytearray()

    def put(self, off: int, data: bytes) -> None:
        if len(self.buf) < off + len(data):
            self.buf.extend(bytes(off + len(data) - len(self.buf)))
        self.buf[off: off + len(data)] = data

    def gpa(self, off: int) -> int:
        return (self.base + off) & ((1 << 64) - 1)

    def desc(self, ring: Ring, i: int, off: int, length: int, flags: int = 0, nxt: int = 0,
             raw_addr: int | None = None) -> None:
        addr = raw_addr if raw_addr is not None else self.gpa(off)
        self.put(ring.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def table(self, at: int, entries: list[tuple[int, int, int, int]]) -> None:
        """An indirect table: (offset, len, flags, next) per entry."""
        for i, (off, length, flags, nxt) in enumerate(entries):
            self.put(at + 16 * i, struct.pack("<QIHH", self.gpa(off), length, flags, nxt))

    def chain(self, ring: Ring, first: int, bufs: list[tuple[int, int, int]]) -> int:
        """Descriptors first.. for (offset, len, writable) buffers; returns the head."""
        for k, (off, length, w) in enumerate(bufs):
            last = k + 1 == len(bufs)
            self.desc(ring, first + k, off, length, (W if w else 0) | (0 if last else N),
                      0 if last else first + k + 1)
        return first

    def publish(self, ring: Ring) -> None:
        for k, head in enumerate(ring.heads):
            self.put(ring.avail + 4 + 2 * ((ring.last_avail + k) % ring.num), struct.pack("<H", head))


def blk_hdr(type_: int, sector: int) -> bytes:
    return struct.pack("<IIQ", type_, 0, sector)


# --- fuzz_vring_blk -------------------------------------------------------------

def blk_input(ring: Ring, img: Image, *, indirect: bool = False, event_idx: bool = False,
              two: bool = False, ro: bool = False, uring: bool = False, gap: bool = False,
              no_call: bool = False, pages: tuple[int, int] = (1, 1), base_sel: int = 1,
              serial_len: int = 20, inflight: bytes | None = None) -> bytes:
    img.publish(ring)
    flags = (indirect * 1 | event_idx * 2 | two * 4 | ro * 8 | uring * 16 | gap * 32 | no_call * 64
             | (inflight is not None) * 128)
    hdr = struct.pack("<BBBB", flags, log2(ring.num), (pages[0] - 1) | (pages[1] - 1) << 4,
                      (base_sel & 3) | serial_len << 2)
    if inflight is not None:
        assert len(inflight) == 16 + 16 * ring.num
    return hdr + ring.header() + (inflight or b"") + bytes(img.buf)


def inflight_region(num: int, version: int = 1, used_idx: int = 0,
                    in_flight: dict[int, int] | None = None) -> bytes:
    """vhd.h struct vhd_inflight_region: heads in flight with their pop counters."""
    out = struct.pack("<QHHHH", 0, version, num, 0, used_idx)
    for i in range(num):
        counter = (in_flight or {}).get(i)
        out += struct.pack("<B5xHQ", 1 if counter is not None else 0, 0, counter or 0)
    return out


def blk_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    base = base_of(1, PAGE)

    # One of each request kind, direct chains.
    r = Ring.at(0, 8)
    img = Image(base)
    img.put(0x200, blk_hdr(T_IN, 3))
    r.heads.append(img.chain(r, 0, [(0x200, 16, 0), (0x800, 1024, 1), (0x210, 1, 1)]))
    img.put(0x220, blk_hdr(T_OUT, 60))
    r.heads.append(img.chain(r, 3, [(0x220, 16, 0), (0xC00, 512, 0), (0x230, 1, 1)]))   # data: zeros
    img.put(0x240, blk_hdr(T_FLUSH, 0))
    r.heads.append(img.chain(r, 6, [(0x240, 16, 0), (0x250, 1, 1)]))
    out["read-write-flush"] = blk_input(r, img, pages=(1, 1))

    r = Ring.at(0, 4)
    img = Image(base)
    img.put(0x100, blk_hdr(T_GET_ID, 0))
    r.heads.append(img.chain(r, 0, [(0x100, 8, 0), (0x108, 8, 0), (0x120, 20, 1), (0x140, 1, 1)]))
    img.put(0x150, struct.pack("<I", 0x77) + bytes(12))   # unsupported type
    r.heads.append(img.chain(r, 2, [(0x150, 16, 0), (0x170, 1, 1)]))
    out["get-id-split-header-unsupp"] = blk_input(r, img, serial_len=33, event_idx=True)

    # Indirect read spread over both regions, EVENT_IDX, io_uring.
    base2 = base_of(1, 2 * PAGE)
    r = Ring.at(0, 16)
    img = Image(base2)
    img.put(0x300, blk_hdr(T_IN, 62))
    img.table(0x380, [(0x300, 16, N, 1), (PAGE - 512, 1024, W | N, 2), (0x3f0, 1, W, 0)])
    img.desc(r, 5, 0x380, 48, I)
    r.heads.append(5)
    img.put(0x400, blk_hdr(T_OUT, 0))
    r.heads.append(img.chain(r, 6, [(0x400, 16, 0), (PAGE - 256, 512, 0), (0x410, 1, 1)]))
    out["indirect-cross-region"] = blk_input(r, img, indirect=True, event_idx=True, two=True)
    out["indirect-cross-region-uring"] = blk_input(r, img, indirect=True, event_idx=True, two=True,
                                                   uring=True)
    out["indirect-cross-region-readonly"] = blk_input(r, img, indirect=True, two=True, ro=True, gap=True)

    # A ring of 256 (avail and used rings first, then the table), two
    # chains of the same descriptors, avail index wrapping.
    total = 4 * PAGE
    r = Ring(256, desc=0xA10, avail=0, used=0x208, last_avail=0xFFFF)
    img = Image(base_of(2, total))
    for i in range(2):   # the header is past the image: zeros, a read of sector 0
        img.desc(r, 2 * i, 0x3000, 16, N, 2 * i + 1)
        img.desc(r, 2 * i + 1, 0x3020 + 8 * i, 8 if i else 1, W)
        r.heads.append(2 * i)
    r.heads.append(2)
    out["ring256-wrap"] = blk_input(r, img, pages=(4, 1), base_sel=2)

    # Inflight tracking: a new region, and one a previous back-end left with
    # heads 3 and 1 in flight (resubmitted first, in pop order), then one new.
    r = Ring.at(0, 4, used_idx=7, last_avail=7)
    img = Image(base)
    img.put(0x100, blk_hdr(T_IN, 5))
    img.put(0x120, blk_hdr(T_OUT, 6))
    img.chain(r, 0, [(0x100, 16, 0), (0x140, 512, 1), (0x110, 1, 1)])
    img.desc(r, 3, 0x120, 16, N, 1)
    img.desc(r, 1, 0x400, 512, N, 2)
    img.desc(r, 2, 0x111, 1, W)
    r.heads += [3, 1, 0]
    r.last_avail = 7
    out["inflight-resubmit"] = blk_input(r, img, inflight=inflight_region(4, 1, 7, {3: 10, 1: 12}))
    out["inflight-resubmit-uring"] = blk_input(r, img, uring=True, event_idx=True,
                                              inflight=inflight_region(4, 1, 7, {3: 10, 1: 12}))
    out["inflight-new-region"] = blk_input(r, img, inflight=inflight_region(4, 0))

    # Single requests on io_uring: compared with the sync engine.
    for name, bufs in [("read", [(0x100, 16, 0), (0x200, 1024, 1), (0x110, 1, 1)]),
                       ("write", [(0x120, 16, 0), (0x200, 512, 0), (0x110, 1, 1)]),
                       ("flush", [(0x140, 16, 0), (0x110, 1, 1)]),
                       ("get-id", [(0x160, 16, 0), (0x200, 20, 1), (0x110, 1, 1)])]:
        r = Ring.at(0, 4)
        img = Image(base)
        img.put(0x100, blk_hdr(T_IN, 60 if name == "read" else 2))
        img.put(0x120, blk_hdr(T_OUT, 62))
        img.put(0x140, blk_hdr(T_FLUSH, 0))
        img.put(0x160, blk_hdr(T_GET_ID, 0))
        r.heads.append(img.chain(r, 0, bufs))
        out[f"uring-single-{name}"] = blk_input(r, img, uring=True)

    # Memory at the top of the address space.
    r = Ring.at(0, 2)
    img = Image(base_of(3, 2 * PAGE))
    img.put(0x100, blk_hdr(T_IN, 0))
    r.heads.append(img.chain(r, 0, [(0x100, 16, 0), (2 * PAGE - 513, 513, 1)]))
    out["top-of-address-space"] = blk_input(r, img, two=True, base_sel=3)

    # Classic ring errors.
    def one(bufs_fn: object, **kw: object) -> bytes:
        r = Ring.at(0, 4)
        img = Image(base)
        img.put(0x100, blk_hdr(T_IN, 0))
        bufs_fn(r, img)   # type: ignore[operator]
        return blk_input(r, img, **kw)   # type: ignore[arg-type]

    def head_oob(r: Ring, img: Image) -> None:
        r.heads.append(9)

    def loop(r: Ring, img: Image) -> None:
        img.desc(r, 0, 0x100, 16, N, 1)
        img.desc(r, 1, 0x110, 1, N, 0)
        r.heads.append(0)

    def next_oob(r: Ring, img: Image) -> None:
        img.desc(r, 0, 0x100, 16, N, 7)
        r.heads.append(0)

    def bad_addr(r: Ring, img: Image) -> None:
        img.desc(r, 0, 0, 16, N, 1, raw_addr=(1 << 64) - 8)
        img.desc(r, 1, 0x110, 1, W)
        r.heads.append(0)

    def order(r: Ring, img: Image) -> None:
        img.chain(r, 0, [(0x110, 1, 1), (0x100, 16, 0)])
        r.heads.append(0)

    def nested_indirect(r: Ring, img: Image) -> None:
        img.table(0x180, [(0x1c0, 16, I, 0)])
        img.desc(r, 0, 0x180, 16, I)
        r.heads.append(0)

    out["err-head"] = one(head_oob)
    out["err-loop"] = one(loop)
    out["err-next"] = one(next_oob)
    out["err-addr-overflow"] = one(bad_addr)
    out["err-order"] = one(order)
    out["err-nested-indirect"] = one(nested_indirect, indirect=True)
    out["err-indirect-not-negotiated"] = one(nested_indirect)
    r = Ring.at(0, 4, avail_idx=9)
    img = Image(base)
    out["err-avail-idx"] = blk_input(r, img)
    return out


def blk_repros() -> dict[str, bytes]:
    # The used ring laid over the avail ring: used->idx *is* avail->idx.
    # With used->idx one ahead of last_avail_idx, every used element the
    # device publishes makes one more chain available: a zero-length chain
    # (no status byte) is completed forever and vhd_process_ring() never
    # returns.
    r = Ring(4, desc=0x40, avail=0, used=0, last_avail=0, used_idx=1)
    img = Image(base_of(1, PAGE))
    img.desc(r, 0, 0x100, 0)
    out = {"self-feeding-used-over-avail": blk_input(r, img)}
    # used->flags laid over avail->idx (used = avail + 2), no EVENT_IDX,
    # last_avail_idx 1: disable_notify stores 1 there (nothing pending),
    # enable_notify stores 0 (pending again): the drain loop flips the index
    # itself forever and never pops a chain.  (Found by the fuzzer.)
    r = Ring(4, desc=0x40, avail=0x102, used=0x104, last_avail=1, avail_idx=0)
    img = Image(base_of(1, PAGE))
    out["notify-flags-over-avail-idx"] = blk_input(r, img)
    # A read of no data (header and status only): the sync engine completes
    # it OK, io_uring with IOERR (a 0-byte transfer is taken for EOF).
    r = Ring.at(0, 4)
    img = Image(base_of(1, PAGE))
    img.put(0x100, blk_hdr(T_IN, 8))
    r.heads.append(img.chain(r, 0, [(0x100, 16, 0), (0x110, 1, 1)]))
    out["zero-length-read-uring"] = blk_input(r, img, uring=True)
    # Inflight tracking after a restart: all 4 heads of a ring of 4 were in
    # flight (resubmitted first), and the guest has 4 new chains available.
    # One drain batch pushes 8 heads before it publishes, and vhd_vring_push()
    # appends each to vr->unpublished, calloc'd for 4: heap overflow.
    r = Ring.at(0, 4, used_idx=0)
    img = Image(base_of(1, PAGE))
    for i in range(4):
        img.desc(r, i, 0x200, 0)          # empty chains: completed without I/O
    r.last_avail = 4
    r.heads += [0, 1, 2, 3]
    out["inflight-unpublished-overflow"] = blk_input(
        r, img, inflight=inflight_region(4, 1, 0, {0: 1, 1: 2, 2: 3, 3: 4}))
    return out


# --- fuzz_vring_net -----------------------------------------------------------

def net_hdr(flags: int = 0, gso: int = 0, hdr_len: int = 0, gso_size: int = 0, csum_start: int = 0,
            csum_off: int = 0, size: int = 12) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso, hdr_len, gso_size, csum_start, csum_off, 0)[:size]


def net_input(tx: Ring, rx: Ring, img: Image, *, indirect: bool = False, event_idx: bool = False,
              two: bool = False, mrg: bool = False, hdr10: bool = False, gap: bool = False,
              sockets: bool = False, no_call: bool = False, pages: tuple[int, int] = (1, 1),
              base_sel: int = 1, frames: int = 0, skip_tx: bool = False, skip_rx: bool = False,
              tx_gso: int = 0, frame_len: int = 60, ctrl: bool = False, max_pairs: int = 1) -> bytes:
    img.publish(tx)
    img.publish(rx)
    flags = (indirect * 1 | event_idx * 2 | two * 4 | mrg * 8 | hdr10 * 16 | gap * 32 | sockets * 64
             | no_call * 128)
    misc = (base_sel & 3) | frames << 2 | skip_tx << 4 | skip_rx << 5 | ctrl << 6
    assert tx.num == rx.num
    return (struct.pack("<BBBB", flags, log2(tx.num), (pages[0] - 1) | (pages[1] - 1) << 4, misc)
            + tx.header() + rx.header() + struct.pack("<BBH", tx_gso, max_pairs - 1, frame_len) + bytes(img.buf))


def net_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    base = base_of(1, 2 * PAGE)
    eth = bytes.fromhex("ffffffffffff020000000001") + b"\x08\x00" + bytes(46)

    def pair(num: int = 8) -> tuple[Ring, Ring, Image]:
        tx = Ring.at(0, num)
        rx = Ring.at(tx.end() + 15 & ~15, num)
        return tx, rx, Image(base)

    # TX: a plain frame, a TCPv4 GSO frame (CSUM|TSO4), a bad header; RX: two 2 KiB buffers.
    tx, rx, img = pair()
    img.put(0x200, net_hdr() + eth[:14])
    tx.heads.append(img.chain(tx, 0, [(0x200, 12 + 60, 0)]))
    img.put(0x220, net_hdr(1, 1, 54, 1448, 34, 16))
    img.put(0x230, eth[:14])
    tx.heads.append(img.chain(tx, 1, [(0x220, 12, 0), (0x230, 260, 0)]))
    img.put(0x240, net_hdr(0x80, 9))
    tx.heads.append(img.chain(tx, 3, [(0x240, 72, 0)]))
    rx.heads.append(img.chain(rx, 0, [(0x800, 2048, 1)]))
    rx.heads.append(img.chain(rx, 1, [(PAGE + 0x100, 1024, 1), (PAGE + 0x600, 1024, 1)]))
    out["tx-rx-null"] = net_input(tx, rx, img, two=True, tx_gso=1 | 16)
    out["tx-rx-socket"] = net_input(tx, rx, img, two=True, tx_gso=31, sockets=True, frames=2, frame_len=1400)
    out["tx-rx-socket-hdr10-eventidx"] = net_input(tx, rx, img, two=True, sockets=True, frames=1, hdr10=True,
                                                   event_idx=True, frame_len=200)

    # RX with MRG_RXBUF: a 3000-byte frame over four 1 KiB chains, indirect too.
    tx, rx, img = pair(8)
    for k in range(3):
        rx.heads.append(img.chain(rx, k, [(0x400 + 0x400 * k, 1024, 1)]))
    img.table(0x200, [(0x1500, 512, W | N, 1), (0x1800, 512, W, 0)])
    img.desc(rx, 3, 0x200, 32, I)
    rx.heads.append(3)
    out["rx-mrg-socket"] = net_input(tx, rx, img, two=True, mrg=True, sockets=True, frames=1, frame_len=3000,
                                     indirect=True, skip_tx=True)
    out["rx-mrg-null"] = net_input(tx, rx, img, two=True, mrg=True, indirect=True, frame_len=1514)

    # TX through an indirect table across the regions, UDP GSO, ring of 64.
    tx, rx, img = pair(64)
    img.put(0x6E0, net_hdr(0, 3, 42, 1400))
    img.table(0x6F0, [(0x6E0, 12, N, 1), (PAGE - 100, 1000, 0, 0)])   # the frame crosses the regions
    img.desc(tx, 10, 0x6F0, 32, I)
    tx.heads.append(10)
    out["tx-indirect-udp-gso"] = net_input(tx, rx, img, two=True, indirect=True, tx_gso=2, sockets=True,
                                           skip_rx=True)
    # The control queue: MQ pairs, MAC address and tables, RX mode,
    # ANNOUNCE ack, and malformed ones (short, unknown class, too many MACs).
    tx, rx, img = pair(32)
    cmds = [bytes([4, 0]) + struct.pack("<H", 3), bytes([4, 0]) + struct.pack("<H", 9),
            bytes([1, 1]) + bytes.fromhex("020000000042"),
            bytes([1, 0]) + struct.pack("<I", 1) + bytes(6) + struct.pack("<I", 2) + bytes(12),
            bytes([1, 0]) + struct.pack("<I", 0x40000000), bytes([0, 0, 1]), bytes([0, 5, 1]),
            bytes([3, 0]), bytes([7, 7]), bytes([4])]
    off = 0x800
    for k, cmd in enumerate(cmds):
        img.put(off, cmd)
        bufs = [(off, 2, 0), (off + 2, len(cmd) - 2, 0)] if len(cmd) > 2 else [(off, len(cmd), 0)]
        rx.heads.append(img.chain(rx, 3 * k, [b for b in bufs if b[1]] + [(0xC00 + k, 1, 1)]))
        off += 32
    out["ctrl-commands"] = net_input(tx, rx, img, two=True, ctrl=True, max_pairs=4, skip_tx=True)

    # Rings with errors: RX buffer readable; TX head out of range.
    tx, rx, img = pair(4)
    tx.heads.append(7)
    rx.heads.append(img.chain(rx, 0, [(0x400, 100, 0)]))
    out["err-head-and-readable-rx"] = net_input(tx, rx, img, two=True, sockets=True, frames=1)
    return out


def net_repros() -> dict[str, bytes]:
    # Null back-end, no MRG_RXBUF, one RX buffer big enough for the header
    # but not for the 60-byte frame: the frame is dropped, the chain given
    # back, the same frame generated again... vhd_net_rx() never returns.
    tx = Ring.at(0, 2)
    rx = Ring.at(0x100, 2)
    img = Image(base_of(1, PAGE))
    rx.heads.append(img.chain(rx, 0, [(0x400, 20, 1)]))
    out = {"null-rx-drop-spin": net_input(tx, rx, img, skip_tx=True)}
    # An RX chain of 1024 device-writable segments (an indirect table of 512
    # buffers, each across the two regions): rx_one() adds its bounce buffer
    # and readv()s 1025 iovecs, more than IOV_MAX: EINVAL, and vhd_net_rx()
    # reports the back-end empty (VHD_RX_IDLE) with the frame still queued.
    # With a tap the worker then wakes up for the readable tap forever.
    tx = Ring.at(0, 4)
    rx = Ring.at(0x100, 4)
    img = Image(base_of(1, 4 * PAGE))
    img.table(0x200, [(3 * PAGE - 1, 2, W | (N if i < 511 else 0), i + 1) for i in range(512)])
    img.desc(rx, 0, 0x200, 16 * 512, I)
    rx.heads.append(0)
    out["rx-1024-segments-idle"] = net_input(tx, rx, img, indirect=True, two=True, pages=(3, 1), sockets=True,
                                             frames=1, skip_tx=True)
    # TX on a socket back-end (the io_uring TX path): a good frame, then a
    # head out of range.  The ring breaks in the batch that sent the frame,
    # and vhd_net_tx() returns 0 chains handled instead of 1.
    tx = Ring.at(0, 4)
    rx = Ring.at(0x100, 4)
    img = Image(base_of(1, PAGE))
    img.put(0x200, net_hdr())
    tx.heads += [img.chain(tx, 0, [(0x200, 72, 0)]), 9]
    out["tx-count-broken-batch"] = net_input(tx, rx, img, sockets=True, skip_rx=True)
    return out


# --- fuzz_mem ------------------------------------------------------------------

def mem_region(gpa: int, size: int, uva: int, off: int) -> bytes:
    return bytes([0b10101010]) + struct.pack("<QQQQ", gpa, size, uva, off)


def mem_op(kind: int, addr: int, length: int, max_iov: int = 16) -> bytes:
    data = bytes([kind | 2 << 2 | 2 << 4]) + struct.pack("<QQ", addr, length)
    return data + (bytes([max_iov - 1]) if kind >= 2 else b"")


def mem_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    a = 0x100000
    # Two adjacent regions (offset into the file), translations inside,
    # across, at the edges, and out.
    regs = mem_region(a, 2 * PAGE, 0x7f0000000000, 0) + mem_region(a + 2 * PAGE, PAGE, 0x7f0000100000, 3 * PAGE)
    ops = (mem_op(0, a, 16) + mem_op(0, a + 2 * PAGE - 8, 16) + mem_op(1, 0x7f0000100000 + 100, 200)
           + mem_op(2, a + PAGE, 2 * PAGE, 16) + mem_op(2, a + PAGE, 2 * PAGE, 1) + mem_op(3, a - 1, 2)
           + mem_op(0, (1 << 64) - 1, 1) + mem_op(2, a, 0))
    out["adjacent"] = bytes([2]) + regs + ops
    # Overlaps, zero size, overflow, a region at the top, unaligned offset; more than 8.
    regs = (mem_region(0, PAGE, 0x1000, 0) + mem_region(0x800, PAGE, 0x9000, 0)
            + mem_region(0x10000, 0, 0x20000, 0) + mem_region((1 << 64) - PAGE, PAGE, 0x30000, 0)
            + mem_region((1 << 64) - 2 * PAGE, PAGE, (1 << 64) - PAGE, 7)
            + mem_region(0x40000, PAGE, 0x40000, 15 * PAGE + 1))
    ops = mem_op(0, (1 << 64) - 2 * PAGE, PAGE) + mem_op(1, (1 << 64) - PAGE, PAGE) + mem_op(2, 0xFFF, 2, 4)
    out["edges"] = bytes([6]) + regs + ops
    regs = b"".join(mem_region(i * PAGE, PAGE, 0x50000 + i * PAGE, i * PAGE) for i in range(9))
    out["full-table"] = bytes([9]) + regs + mem_op(2, 0, 9 * PAGE, 16) + mem_op(2, 100, 8 * PAGE, 7)
    return out


# --- main ------------------------------------------------------------------------

# --- fuzz_vring_packed ------------------------------------------------------------

PA, PU = 1 << 7, 1 << 15                # VRING_PACKED_DESC_F_AVAIL, _USED


class Packed:
    """A packed ring in an Image: descriptors at `desc`, the driver and device
    event areas after them; chains are written in ring order."""

    def __init__(self, img: Image, num: int, desc: int = 0, avail: int = 0x8000, used: int | None = None) -> None:
        self.img, self.num, self.desc = img, num, desc
        self.driver = desc + 16 * num
        self.device = self.driver + 4
        self.pos, self.wrap = avail & 0x7FFF, bool(avail & 0x8000)
        self.avail_base = avail
        self.used_base = avail if used is None else used

    def put(self, addr: int, length: int, flags: int, id_: int, wrap_bits: bool = True) -> None:
        bits = (PA if self.wrap else PU) if wrap_bits else 0
        self.img.put(self.desc + 16 * self.pos, struct.pack("<QIHH", addr, length, id_, flags | bits))
        self.pos += 1
        if self.pos == self.num:
            self.pos, self.wrap = 0, not self.wrap

    def chain(self, id_: int, bufs: list[tuple[int, int, int]]) -> None:
        """(offset, len, writable) buffers as one chain with buffer id id_."""
        for k, (off, length, w) in enumerate(bufs):
            self.put(self.img.gpa(off), length, (W if w else 0) | (N if k + 1 < len(bufs) else 0), id_)

    def header(self) -> bytes:
        return struct.pack("<5H", self.desc, self.driver, self.device, self.avail_base, self.used_base)

    def laps(self) -> None:
        """What the ring holds before the start position: used descriptors of
        this lap behind it, of the previous lap from it on."""
        for i in range(self.num):
            cur = i < self.pos
            lap = self.wrap if cur else not self.wrap
            self.img.put(self.desc + 16 * i + 14, struct.pack("<H", PA | PU if lap else 0))

    def table(self, at: int, entries: list[tuple[int, int, int]]) -> None:
        """A packed indirect table: (offset, len, flags) per entry."""
        for i, (off, length, flags) in enumerate(entries):
            self.img.put(at + 16 * i, struct.pack("<QIHH", self.img.gpa(off), length, 0, flags))


def packed_input(r: Packed, *, indirect: bool = False, event_idx: bool = False, two: bool = False,
                 ro: bool = False, uring: bool = False, device: int = 0, pages: tuple[int, int] = (1, 1),
                 base_sel: int = 1, inflight: bytes | None = None) -> bytes:
    flags = (indirect * 1 | event_idx * 2 | two * 4 | ro * 8 | uring * 16 | (inflight is not None) * 128)
    hdr = struct.pack("<BBBB", flags, (r.num - 1) % 128, (pages[0] - 1) | (pages[1] - 1) << 4,
                      (base_sel & 3) | device << 2)
    return hdr + r.header() + (inflight or b"") + bytes(r.img.buf)


def packed_region(num: int, used: int = 0, used_wrap: int = 1, heads: list[tuple[int, int, list[tuple]]] = ()) -> bytes:
    """vhd.h struct vhd_inflight_region_packed: heads (entry, counter, [(addr, len, id, flags)])
    in flight, their descriptors in consecutive entries; the rest free."""
    taken: dict[int, tuple] = {}
    for entry, counter, descs in heads:
        for k, d in enumerate(descs):
            taken[entry + k] = (k == 0, counter, len(descs), entry + len(descs) - 1, d)
    free = [i for i in range(num) if i not in taken]
    nxt = {f: (free[j + 1] if j + 1 < len(free) else num) for j, f in enumerate(free)}
    head = free[0] if free else num
    out = struct.pack("<QHHHHHHBB10x", 0, 1, num, head, head, used, used, used_wrap, used_wrap)
    for i in range(num):
        if i in taken:
            is_head, counter, n, last, (addr, length, id_, flags) = taken[i]
            out += struct.pack("<BBHHHQHHIQ", int(is_head), 0, i + 1, last if is_head else 0,
                               n if is_head else 0, counter if is_head else 0, id_, flags, length, addr)
        else:
            out += struct.pack("<BBHHHQHHIQ", 0, 0, nxt[i], 0, 0, 0, 0, 0, 0, 0)
    return out


def packed_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    base = base_of(1, PAGE)
    img = Image(base)
    r = Packed(img, 8)
    img.put(0x200, blk_hdr(T_IN, 3))
    r.chain(0, [(0x200, 16, 0), (0x800, 1024, 1), (0x210, 1, 1)])
    img.put(0x220, blk_hdr(T_OUT, 60))
    r.chain(5, [(0x220, 16, 0), (0xC00, 512, 0), (0x230, 1, 1)])
    img.put(0x240, blk_hdr(T_FLUSH, 0))
    r.chain(2, [(0x240, 16, 0), (0x250, 1, 1)])
    out["blk-read-write-flush"] = packed_input(r)
    out["blk-read-write-flush-uring"] = packed_input(r, uring=True, event_idx=True)
    out["blk-read-write-flush-readonly"] = packed_input(r, ro=True)

    # Indirect over both regions, a ring of 6 starting in lap 0 at position 4.
    base2 = base_of(1, 2 * PAGE)
    img = Image(base2)
    r = Packed(img, 6, avail=4)
    r.laps()
    img.put(0x300, blk_hdr(T_IN, 62))
    r.table(0x380, [(0x300, 16, 0), (PAGE - 512, 1024, W), (0x3F0, 1, W)])
    r.put(img.gpa(0x380), 48, I, 3)
    img.put(0x400, blk_hdr(T_OUT, 0))
    r.chain(4, [(0x400, 16, 0), (PAGE - 256, 512, 0), (0x410, 1, 1)])   # wraps to lap 1
    out["blk-indirect-wrap"] = packed_input(r, indirect=True, event_idx=True, two=True)

    # Inflight: a previous back-end had ids 1 and 3 in flight (their ring
    # slots since overwritten), then one new chain.
    img = Image(base)
    r = Packed(img, 8, avail=0x8000 | 5, used=0x8000)
    r.laps()
    img.put(0x100, blk_hdr(T_IN, 5))
    img.put(0x120, blk_hdr(T_OUT, 6))
    g = img.gpa
    region = packed_region(8, 0, 1, [(0, 10, [(g(0x120), 16, 0, N), (g(0x400), 512, 0, N), (g(0x111), 1, 3, W)]),
                                     (3, 12, [(g(0x100), 16, 0, N), (g(0x140), 1, 1, W)])])
    r.chain(6, [(0x100, 16, 0), (0x180, 512, 1), (0x112, 1, 1)])
    out["blk-inflight-resubmit"] = packed_input(r, inflight=region)
    out["blk-inflight-new-region"] = packed_input(r, inflight=bytes(32 + 32 * 8))

    # Net: TX frames and RX buffers (null back-end), MRG_RXBUF.
    img = Image(base)
    r = Packed(img, 8)
    r.chain(0, [(0x200, 12, 0), (0x220, 60, 0)])
    r.chain(1, [(0x300, 72, 0)])
    out["net-tx"] = packed_input(r, device=1, event_idx=True)
    img = Image(base)
    r = Packed(img, 8)
    for i in range(3):
        r.chain(i, [(0x200 + 0x100 * i, 0x40, 1), (0x240 + 0x100 * i, 0x40, 1)])
    out["net-rx"] = packed_input(r, device=2)
    out["net-rx-mrg"] = packed_input(r, device=3, event_idx=True)

    # Hostile: a chain longer than the ring, an id out of range, one id twice,
    # a flipped wrap counter, nested indirect.
    img = Image(base)
    r = Packed(img, 4)
    for _ in range(4):
        r.put(img.gpa(0x200), 16, N, 0)
    out["bad-chain-longer-than-ring"] = packed_input(r)
    img = Image(base)
    r = Packed(img, 4)
    img.put(0x200, blk_hdr(T_FLUSH, 0))
    r.chain(9, [(0x200, 16, 0), (0x210, 1, 1)])
    out["bad-id-out-of-range"] = packed_input(r)
    img = Image(base)
    r = Packed(img, 8)
    img.put(0x200, blk_hdr(T_FLUSH, 0))
    r.chain(2, [(0x200, 16, 0), (0x210, 1, 1)])
    r.chain(2, [(0x200, 16, 0), (0x211, 1, 1)])
    out["bad-id-twice-uring"] = packed_input(r, uring=True)
    img = Image(base)
    r = Packed(img, 4)
    r.put(img.gpa(0x200), 16, PA | PU, 0, wrap_bits=False)
    out["bad-wrap-flipped"] = packed_input(r)
    img = Image(base)
    r = Packed(img, 4)
    r.table(0x380, [(0x300, 16, I)])
    r.put(img.gpa(0x380), 16, I, 0)
    out["bad-nested-indirect"] = packed_input(r, indirect=True)
    return out


def write(directory: Path, files: dict[str, bytes], clear: bool = True) -> None:
    if clear and directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)


def stale(directory: Path, files: dict[str, bytes], exact: bool) -> list[str]:
    """Files that differ from what this script writes (missing, changed, or extra if exact)."""
    out = [name for name, data in files.items()
           if not (directory / name).is_file() or (directory / name).read_bytes() != data]
    if exact and directory.is_dir():
        out += [p.name for p in directory.iterdir() if p.name not in files]
    return [str(directory.relative_to(HERE) / n) for n in out]


def with_dirty_log(seeds: dict[str, bytes]) -> dict[str, bytes]:
    """Each seed, and the same with dirty logging on (used ring included):
    byte 2, bits 3 and 7, in both ring harnesses."""
    out = dict(seeds)
    for name, data in seeds.items():
        out[name + "-logged"] = data[:2] + bytes([data[2] | 0x88]) + data[3:]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that the files on disk are current")
    args = ap.parse_args()
    corpora = {"fuzz_vring_blk": with_dirty_log(blk_seeds()), "fuzz_vring_net": with_dirty_log(net_seeds()),
               "fuzz_vring_packed": with_dirty_log(packed_seeds()), "fuzz_mem": mem_seeds()}
    repros = {"fuzz_vring_blk": blk_repros(), "fuzz_vring_net": net_repros()}
    if args.check:
        bad = [f for t, files in corpora.items() for f in stale(HERE / "corpus" / t, files, True)]
        bad += [f for t, files in repros.items() for f in stale(HERE / "repro" / t, files, False)]
        if bad:
            print("out of date (run python3 fuzz/gen_corpus.py):", " ".join(bad))
            return 1
        return 0
    for target, files in corpora.items():
        write(HERE / "corpus" / target, files)
    for target, files in repros.items():
        write(HERE / "repro" / target, files, clear=False)   # keeps reproducers saved by hand
    total = sum(len(d) for c in (*corpora.values(), *repros.values()) for d in c.values())
    print(f"wrote {sum(map(len, corpora.values()))} seeds and {sum(map(len, repros.values()))} "
          f"reproducers, {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
