"""The ring-model property tests of test_vring_model.py on packed rings.

``test_random_packed_rings_match_the_model``: a packed ring of 8 whose
slots hold random descriptors (any AVAIL/USED bits, ids, flags, addresses)
among plausible request chains a driver would write; after each step the
device runs once and a Python model of virtio 1.2 2.8 as vhostd implements
it predicts everything: which chains it consumes (it follows the ring
while descriptors look available), the VHD_ERR_* that breaks the ring, each
used descriptor (buffer id, length) in order, every byte of guest memory
outside the ring and of the file, and both ring positions.

``test_random_packed_rings_never_escape``: anything at all in the ring and
in indirect tables: processing ends, never writes outside guest memory or
into memory the driver did not make device-writable, and the ring is
broken iff its err eventfd was signalled.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from hypothesis import Phase, event, given, settings
from hypothesis import strategies as st

from test_vring_model import (
    ARENA, BASE, END, LENS, NUM, REGION, SECTORS, SERIAL, SPECIAL_ADDRS, U64, Chain, Err, Model,
    add_buffer, header_bytes, inside_one, plausible_chain, ram_bytes, workdir,
)
from vhd_helpers import GuardedRam, Rig
from vhostd._native import lib
from vhostd.frontend import PackedDriverRing
from vhostd.native import RING_ERRORS

pytestmark = pytest.mark.usefixtures("watchdog")

N, W, I = 1, 2, 4
A, U = 1 << 7, 1 << 15


class PackedModel(Model):
    """Model's memory and blk semantics, with a packed ring's pop."""

    def __init__(self, mem: bytearray, desc: int, indirect: bool) -> None:
        super().__init__(mem, desc, 0, indirect)

    def pop_packed(self, pos: int, wrap: bool) -> tuple[Chain, int, int, bool] | None:
        """(chain, buffer id, next position, next wrap), None if nothing is available."""
        flags = struct.unpack("<H", self.read(self.desc + 16 * pos + 14, 2))[0]
        a, u = bool(flags & A), bool(flags & U)
        if not (a == wrap and u != wrap):
            if a == u == wrap:
                raise Err(lib.VHD_ERR_WRAP)
            return None
        c = Chain(0, [], [], 0, 0)
        ndesc, id_ = 0, 0
        while True:
            ndesc += 1
            if ndesc > NUM:
                raise Err(lib.VHD_ERR_CHAIN_LEN)
            addr, n, id_, f = struct.unpack("<QIHH", self.read(self.desc + 16 * pos, 16))
            if f & I:
                if not self.indirect or f & N or n == 0 or n % 16:
                    raise Err(lib.VHD_ERR_INDIRECT)
                if not inside_one(addr, n):
                    raise Err(lib.VHD_ERR_ADDR)
                for k in range(n // 16):
                    ea, en, _, ef = struct.unpack("<QIHH", self.read(addr + 16 * k, 16))
                    if ef & I:
                        raise Err(lib.VHD_ERR_INDIRECT)
                    self.add(c, ea, en, bool(ef & W))
            else:
                self.add(c, addr, n, bool(f & W))
            pos += 1
            if pos == NUM:
                pos, wrap = 0, not wrap
            if not f & N:
                break
        if id_ >= NUM:
            raise Err(lib.VHD_ERR_HEAD)
        c.head = id_
        return c, ndesc, pos, wrap

    def add(self, c: Chain, addr: int, n: int, writable: bool) -> None:
        add_buffer(c, addr, n, writable)


FLAG_BITS = [0, A, U, A | U, A, U]
KIND = [0, N, W, N | W, 0, N, W, I, I | N]


def addrs(spots: list[int]) -> st.SearchStrategy[int]:
    options = [st.integers(ARENA, END - 1), st.sampled_from(SPECIAL_ADDRS),
               st.integers(0, U64 - 1).filter(lambda a: not BASE <= a < ARENA)]
    if spots:
        options.insert(0, st.builds(lambda s, d: s + d, st.sampled_from(spots), st.sampled_from([0, 0, 1, 16])))
    return st.one_of(*options)


def pdesc(spots: list[int]) -> st.SearchStrategy[tuple[int, int, int, int]]:
    """(addr, len, id, flags) with any AVAIL/USED bits."""
    return st.tuples(addrs(spots), st.one_of(st.sampled_from(LENS), st.integers(0, 20000)),
                     st.one_of(st.integers(0, NUM - 1), st.integers(0, 0xFFFF)),
                     st.builds(lambda k, b: k | b, st.sampled_from(KIND), st.sampled_from(FLAG_BITS)))


def make_rig(workdir: Path, event_idx: bool, indirect: bool, readonly: bool) -> Rig:
    return Rig(workdir, region_sizes=(REGION, REGION), num=NUM, event_idx=event_idx, indirect=indirect,
               sectors=SECTORS, readonly=readonly, serial=SERIAL, guarded=True, packed=True)


# No shrinking: a failing example is reported as drawn (shrinking these runs
# outlasts the 120 s watchdog).
@settings(max_examples=300, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(data=st.data(), event_idx=st.booleans(), indirect=st.booleans(), readonly=st.booleans(),
       seed=st.integers(0, 2**32))
def test_random_packed_rings_match_the_model(workdir: Path, data: st.DataObject, event_idx: bool,
                                             indirect: bool, readonly: bool, seed: int) -> None:
    rig = make_rig(workdir, event_idx, indirect, readonly)
    try:
        ram, ring = rig.ram, rig.ring
        assert isinstance(ring, PackedDriverRing)
        assert ring.used + 4 <= ARENA and ram.regions[0].gpa == BASE
        ram.write(ARENA, random.Random(seed).randbytes(END - ARENA))
        spots: list[int] = []
        for _ in range(data.draw(st.integers(1, 4), label="headers")):
            gpa = data.draw(st.integers(ARENA, END - 16), label="header at")
            ram.write(gpa, data.draw(header_bytes(), label="header"))
            spots.append(gpa)
        for _ in range(data.draw(st.integers(0, 2), label="random indirect tables")):
            entries = data.draw(st.lists(pdesc(spots), min_size=1, max_size=6), label="table")
            gpa = data.draw(st.integers(ARENA, END - 16 * len(entries)), label="table at")
            ram.write(gpa, b"".join(struct.pack("<QIHH", *e) for e in entries))
            spots.append(gpa)
        # Background: every slot random, of the previous lap mostly (not available).
        for i in range(NUM):
            d = data.draw(pdesc(spots), label="background")
            if data.draw(st.integers(0, 3), label="stale") > 0:
                d = (d[0], d[1], d[2], d[3] & ~(A | U) | U)       # lap 0 driver's: not available in lap 1
            ring.write_desc(i, d[0], d[1], d[3], d[2])

        file = bytearray(rig.file())
        pos, wrap, used_pos, used_wrap, broken = 0, True, 0, True, 0
        for _ in range(data.draw(st.integers(1, 5), label="steps")):
            # The driver writes at the device's position: a plausible chain, or random descriptors.
            kind = data.draw(st.sampled_from(["plausible"] * 4 + ["indirect", "random", "nothing"]), label="step")
            bits = A if wrap else U
            id_ = data.draw(st.sampled_from(list(range(NUM)) * 2 + [NUM + 3]), label="id")
            p = pos
            descs: list[tuple[int, int, int, int]] = []
            if kind in ("plausible", "indirect"):
                hdr, hdr_bytes, bufs = data.draw(plausible_chain(), label="chain")
                ram.write(hdr, hdr_bytes)
                if kind == "indirect":
                    t = data.draw(st.integers(ARENA, END - 16 * len(bufs)).map(lambda a: a & ~15), label="at")
                    ram.write(t, b"".join(struct.pack("<QIHH", a, n, 0, f) for a, n, f in bufs))
                    descs = [(t, 16 * len(bufs), id_, I)]
                else:
                    descs = [(a, n, id_, f | (N if k + 1 < len(bufs) else 0)) for k, (a, n, f) in enumerate(bufs)]
                descs = descs[:NUM]
            elif kind == "random":
                descs = data.draw(st.lists(pdesc(spots), min_size=1, max_size=3), label="descs")
            for k, (a, n, i, f) in enumerate(descs):
                w = bits if kind != "random" else 0
                ring.write_desc((p + k) % NUM, a, n, f | (w if (p + k) // NUM == 0 else (U if wrap else A)), i)
            mem = ram_bytes(rig)
            model = PackedModel(mem, ring.desc, indirect)
            expect_used: list[tuple[int, int]] = []
            used_at: list[tuple[int, bool]] = []      # where each used descriptor goes
            busy: set[int] = set()
            code = 0
            mpos, mwrap, mused_pos, mused_wrap = pos, wrap, used_pos, used_wrap
            try:
                while not broken:
                    got = model.pop_packed(mpos, mwrap)
                    if got is None:
                        break
                    chain, ndesc, npos, nwrap = got
                    if chain.head in busy:     # used in this batch, not yet published
                        raise Err(lib.VHD_ERR_ID)
                    mpos, mwrap = npos, nwrap
                    busy.add(chain.head)
                    expect_used.append((chain.head, model.blk(chain, file, readonly)))
                    # The used descriptor, as the device writes it (the batch's
                    # first one's flags only at the flush).
                    used_at.append((mused_pos, mused_wrap))
                    at = ring.desc + 16 * mused_pos
                    model.write(at + 8, struct.pack("<IH", expect_used[-1][1], chain.head))
                    if len(expect_used) > 1:
                        model.write(at + 14, struct.pack("<H", A | U if mused_wrap else 0))
                    mused_pos += ndesc
                    if mused_pos >= NUM:
                        mused_pos, mused_wrap = mused_pos - NUM, not mused_wrap
            except Err as e:
                code = e.code
            n = rig.process()
            actual = ram_bytes(rig)
            event(f"{kind}: {len(expect_used)} chains" + (f", broken {RING_ERRORS[code]}" if code else ""))
            assert n == (0 if broken else len(expect_used)), (n, expect_used, code)
            assert rig.broken == (broken or code)
            assert rig.errors() == (1 if code and not broken else 0)
            for (upos, uwrap), (uid, ulen) in zip(used_at, expect_used):
                _, length, id_, flags = ring.read_desc(upos)
                assert (id_, length) == (uid, ulen) and bool(flags & A) == bool(flags & U) == uwrap, \
                    (upos, uwrap, ring.read_desc(upos), uid, ulen)
            if used_at:     # the flush: the first used descriptor's flags
                model.write(ring.desc + 16 * used_at[0][0] + 14, struct.pack("<H", A | U if used_at[0][1] else 0))
            d0, d1 = ring.desc - BASE, ring.desc - BASE + 16 * NUM
            assert actual[d0:d1] == model.mem[d0:d1], "descriptor ring differs from the model"
            broken = broken or code
            # Where the device stopped: after the chains it used, at the bad one.
            pos, wrap, used_pos, used_wrap = mpos, mwrap, mused_pos, mused_wrap
            assert rig.vring.base == (pos | wrap << 15) | (used_pos | used_wrap << 15) << 16
            assert actual[ARENA - BASE:] == model.mem[ARENA - BASE:], "guest memory differs from the model"
            assert rig.file() == bytes(file), "file differs from the model"
            assert isinstance(ram, GuardedRam) and ram.guard_intact()
            # The driver keeps its view in step with the device (its next writes go there).
            ring.next_avail, ring.avail_wrap = rig.vring.base & 0x7FFF, bool(rig.vring.base & 0x8000)
            if broken:
                break
    finally:
        rig.close()


@settings(max_examples=150)
@given(data=st.data(), event_idx=st.booleans(), indirect=st.booleans(), seed=st.integers(0, 2**32))
def test_random_packed_rings_never_escape(workdir: Path, data: st.DataObject, event_idx: bool,
                                         indirect: bool, seed: int) -> None:
    rig = make_rig(workdir, event_idx, indirect, readonly=False)
    guard = GuardedRam([4096])
    try:
        ram, ring = rig.ram, rig.ring
        assert isinstance(ring, PackedDriverRing)
        ram.write(ARENA, random.Random(seed).randbytes(END - ARENA))
        anywhere = st.one_of(st.integers(BASE, END - 1), st.sampled_from(SPECIAL_ADDRS), st.integers(0, U64 - 1),
                             st.just(ring.desc), st.just(ring.used), st.just(ring.avail))
        for _ in range(data.draw(st.integers(0, 3))):
            ram.write(data.draw(st.integers(BASE, END - 16)), data.draw(header_bytes()))
        for _ in range(data.draw(st.integers(0, 3))):
            entries = data.draw(st.lists(st.tuples(anywhere, st.sampled_from(LENS), st.integers(0, 0xFFFF),
                                                   st.integers(0, 0xFFFF)), min_size=1, max_size=8))
            ram.write(data.draw(st.integers(ARENA, END - 16 * len(entries))),
                      b"".join(struct.pack("<QIHH", *e) for e in entries))
        for i in range(NUM):
            ring.write_desc(i, data.draw(anywhere), data.draw(st.one_of(st.sampled_from(LENS), st.integers(0, 20000))),
                            data.draw(st.integers(0, 0xFFFF)), data.draw(st.integers(0, NUM + 1)))
        size = rig.image.stat().st_size
        n = rig.process()
        s = rig.vring.stats()
        assert s.broken == 0 or s.broken in RING_ERRORS
        assert rig.errors() == (1 if s.broken else 0)
        assert n == s.requests
        if s.broken:
            assert rig.process() == 0
        else:   # nothing more is available where the device stopped
            assert lib.vhd_vring_pending(rig.vring.ptr) == 0
        assert ram.guard_intact() if isinstance(ram, GuardedRam) else False
        assert guard.guard_intact() and bytes(guard.regions[0].map) == bytes(4096)
        assert rig.image.stat().st_size == size == SECTORS * 512
    finally:
        guard.close()
        rig.close()
