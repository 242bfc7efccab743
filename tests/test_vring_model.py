"""Property tests of the C ring walk and virtio-blk handling on random
descriptor tables.

``test_random_rings_match_the_model``: random (mostly hostile) descriptor
tables, indirect tables and request headers; each chain is made available
and processed alone, and a Python model of virtio 1.2 2.7 / 5.2.6 as vhostd
implements it predicts the exact outcome: the VHD_ERR_* that breaks the ring,
or the used element, every byte written to guest memory and to the file.

``test_random_rings_never_escape``: fully random tables (buffers may point
anywhere, the ring itself included), all chains at once: processing ends,
either completes chains or breaks the ring, and never writes outside guest
memory (guard bytes around every region) or past the end of the file.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from vhd_helpers import SECTOR, GuardedRam, Rig
from vhostd._native import lib
from vhostd.native import RING_ERRORS

pytestmark = pytest.mark.usefixtures("watchdog")

N, W, I = 1, 2, 4
NUM = 8
REGION = 8192
BASE = 0x10_0000
END = BASE + 2 * REGION
ARENA = BASE + 1024        # ring structures live below, buffers above
SECTORS = 32
SERIAL = b"model-serial"
U64 = 2**64
OK, IOERR, UNSUPP = 0, 1, 2
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8


# --- the model ---------------------------------------------------------------------------

class Err(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


@dataclass
class Chain:
    head: int
    out: list[tuple[int, int]]     # (gpa, len) per host segment
    inn: list[tuple[int, int]]
    out_len: int
    in_len: int


REGIONS = [(BASE, REGION), (BASE + REGION, REGION)]


def inside_one(gpa: int, n: int) -> bool:
    return any(g <= gpa and gpa - g < s and n <= s - (gpa - g) for g, s in REGIONS)


def segments(gpa: int, n: int, room: int) -> list[tuple[int, int]]:
    """vhd_mem_gpa_to_iov(): Err(ADDR) for bytes outside memory, Err(IOV) when out of room."""
    if (gpa + n) % U64 < gpa:
        raise Err(lib.VHD_ERR_ADDR)
    segs: list[tuple[int, int]] = []
    while n:
        for g, s in REGIONS:
            if g <= gpa < g + s:
                break
        else:
            raise Err(lib.VHD_ERR_ADDR)
        if len(segs) >= room:
            raise Err(lib.VHD_ERR_IOV)
        k = min(g + s - gpa, n)
        segs.append((gpa, k))
        gpa, n = gpa + k, n - k
    return segs


def add_buffer(c: Chain, addr: int, n: int, writable: bool) -> None:
    """One descriptor's buffer joins the chain (the walk's checks, in its order)."""
    if not writable and c.inn:
        raise Err(lib.VHD_ERR_ORDER)
    segs = segments(addr, n, lib.VHD_MAX_IOV - len(c.out) - len(c.inn))
    if writable:
        c.inn += segs
        c.in_len += n
    else:
        c.out += segs
        c.out_len += n
    if c.in_len > 2**32 - 1 or c.out_len > 2**32 - 1:
        raise Err(lib.VHD_ERR_LEN)


class Model:
    def __init__(self, mem: bytearray, desc: int, avail: int, indirect: bool) -> None:
        self.mem, self.desc, self.avail, self.indirect = mem, desc, avail, indirect

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.mem[gpa - BASE: gpa - BASE + n])

    def write(self, gpa: int, data: bytes) -> None:
        self.mem[gpa - BASE: gpa - BASE + len(data)] = data

    def pop(self, last_avail: int) -> Chain | None:
        avail_idx = struct.unpack("<H", self.read(self.avail + 2, 2))[0]
        pending = (avail_idx - last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > NUM:
            raise Err(lib.VHD_ERR_AVAIL_IDX)
        head = struct.unpack("<H", self.read(self.avail + 4 + 2 * (last_avail % NUM), 2))[0]
        if head >= NUM:
            raise Err(lib.VHD_ERR_HEAD)
        return self.walk(head)

    def walk(self, head: int) -> Chain:
        table, size, count, nested = self.desc, NUM, 0, False
        c = Chain(head, [], [], 0, 0)
        i = head
        while True:
            count += 1
            if count > size:
                raise Err(lib.VHD_ERR_CHAIN_LEN)
            addr, n, flags, nxt = struct.unpack("<QIHH", self.read(table + 16 * i, 16))
            if flags & I:
                if not self.indirect or nested or flags & N or n == 0 or n % 16:
                    raise Err(lib.VHD_ERR_INDIRECT)
                if not inside_one(addr, n):
                    raise Err(lib.VHD_ERR_ADDR)
                table, size, count, nested, i = addr, n // 16, 0, True, 0
                continue
            add_buffer(c, addr, n, bool(flags & W))
            if not flags & N:
                return c
            i = nxt
            if i >= size:
                raise Err(lib.VHD_ERR_NEXT)

    def scatter(self, segs: list[tuple[int, int]], data: bytes) -> int:
        done = 0
        for gpa, n in segs:
            k = min(n, len(data) - done)
            self.write(gpa, data[done: done + k])
            done += k
        return done

    def blk(self, c: Chain, file: bytearray, readonly: bool) -> int:
        """Applies the request to mem and file; returns the used length."""
        if c.in_len == 0:
            return 0
        out = b"".join(self.read(g, n) for g, n in c.out)
        status_gpa = c.inn[-1][0] + c.inn[-1][1] - 1
        data_segs = c.inn[:-1] + ([(c.inn[-1][0], c.inn[-1][1] - 1)] if c.inn[-1][1] > 1 else [])
        in_data = c.in_len - 1
        used = 1

        def in_range(sector: int, nbytes: int) -> bool:
            return nbytes % SECTOR == 0 and sector <= SECTORS and nbytes // SECTOR <= SECTORS - sector

        if len(out) < 16:
            status = IOERR
        else:
            type_, _, sector = struct.unpack_from("<IIQ", out)
            if type_ == T_IN:
                status = IOERR
                if in_range(sector, in_data):
                    self.scatter(data_segs, bytes(file[sector * SECTOR: sector * SECTOR + in_data]))
                    status, used = OK, 1 + in_data
            elif type_ == T_OUT:
                data = out[16:]
                status = IOERR
                if not readonly and in_range(sector, len(data)):
                    file[sector * SECTOR: sector * SECTOR + len(data)] = data
                    status = OK
            elif type_ == T_FLUSH:
                status = OK
            elif type_ == T_GET_ID:
                serial = SERIAL.ljust(20, b"\0")
                used += self.scatter(data_segs, serial[: min(in_data, 20)])
                status = OK
            else:
                status = UNSUPP
        self.write(status_gpa, bytes([status]))
        return used


# --- strategies ----------------------------------------------------------------------------

SPECIAL_ADDRS = [0, BASE - 16, BASE - 1, END, END - 1, END - 16, END - 512, BASE + REGION - 1,
                 BASE + REGION - 8, BASE + REGION - 16, BASE + REGION - 512, U64 - 8, U64 - 1, 2**32]
LENS = [0, 1, 7, 8, 15, 16, 17, 32, 48, 64, 96, 511, 512, 513, 1024, 1025, 4096, 8192, 2**31, 2**32 - 1]
FLAGS = [0, N, W, N | W, 0, N, W, N | W, I, I | N, I | W, N | W | I]


def not_in_ring_area(a: int) -> bool:
    return not (BASE <= a < ARENA)


def addrs(spots: list[int]) -> st.SearchStrategy[int]:
    options = [st.integers(ARENA, END - 1), st.sampled_from(SPECIAL_ADDRS),
               st.integers(0, U64 - 1).filter(not_in_ring_area)]
    if spots:
        options.insert(0, st.builds(lambda s, d: s + d, st.sampled_from(spots),
                                    st.sampled_from([0, 0, 0, 1, 8, 16])))
    return st.one_of(*options)


def descs(spots: list[int], max_next: int) -> st.SearchStrategy[tuple[int, int, int, int]]:
    return st.tuples(addrs(spots), st.one_of(st.sampled_from(LENS), st.integers(0, 20000)),
                     st.sampled_from(FLAGS), st.integers(0, max_next))


def header_bytes() -> st.SearchStrategy[bytes]:
    types = st.one_of(st.sampled_from([T_IN, T_OUT, T_FLUSH, T_GET_ID, T_IN, T_OUT]),
                      st.sampled_from([T_IN, T_OUT]), st.integers(0, 2**32 - 1))
    sectors = st.one_of(st.integers(0, SECTORS), st.integers(0, SECTORS - 4),
                        st.sampled_from([0, 1, SECTORS - 2, SECTORS - 1, SECTORS, SECTORS + 1, 2**55, U64 - 1]))
    return st.builds(lambda t, s: struct.pack("<IIQ", t, 0, s), types, sectors)


@st.composite
def plausible_chain(draw: st.DrawFn) -> tuple[int, bytes, list[tuple[int, int, int]]]:
    """A request as a driver would build it: (header gpa, header, [(addr, len, flags)])
    with header, data and status buffers (NEXT flags are added by the caller)."""
    type_ = draw(st.sampled_from([T_IN, T_IN, T_OUT, T_OUT, T_GET_ID, T_FLUSH]))
    nbufs = draw(st.integers(0, 2))
    lens = [draw(st.sampled_from([512, 512, 1024, 1024, 2048, 100])) for _ in range(nbufs)]
    sector = draw(st.one_of(*[st.integers(0, SECTORS - sum(lens) // SECTOR)] * 3, st.integers(0, SECTORS + 1)))
    hdr = draw(st.integers(ARENA, END - 16))
    bufs = [(hdr, 8, 0), (hdr + 8, 8, 0)] if draw(st.booleans()) else [(hdr, 16, 0)]
    writable = type_ in (T_IN, T_GET_ID)
    for n in lens:
        addr = draw(st.one_of(st.integers(ARENA, END - n), st.just(BASE + REGION - n // 2)))
        bufs.append((addr, n, W if writable else 0))
    bufs.append((draw(st.integers(ARENA, END - 1)), 1, W))
    return hdr, struct.pack("<IIQ", type_, 0, sector), bufs


def make_rig(workdir: Path, event_idx: bool, indirect: bool, readonly: bool) -> Rig:
    return Rig(workdir, region_sizes=(REGION, REGION), num=NUM, event_idx=event_idx,
               indirect=indirect, sectors=SECTORS, readonly=readonly, serial=SERIAL, guarded=True)


def ram_bytes(rig: Rig) -> bytearray:
    return bytearray(b"".join(bytes(r.map) for r in rig.ram.regions))


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vhd-model-"))
    yield d
    shutil.rmtree(d)


@settings(max_examples=250)
@given(data=st.data(), event_idx=st.booleans(), indirect=st.booleans(), readonly=st.booleans(),
       seed=st.integers(0, 2**32))
def test_random_rings_match_the_model(workdir: Path, data: st.DataObject, event_idx: bool,
                                      indirect: bool, readonly: bool, seed: int) -> None:
    import random
    rig = make_rig(workdir, event_idx, indirect, readonly)
    try:
        ram, ring = rig.ram, rig.ring
        assert ring.used + 6 + 8 * NUM <= ARENA and ram.regions[0].gpa == BASE
        ram.write(ARENA, random.Random(seed).randbytes(END - ARENA))
        spots: list[int] = []
        for _ in range(data.draw(st.integers(1, 4), label="headers")):
            gpa = data.draw(st.integers(ARENA, END - 16), label="header at")
            ram.write(gpa, data.draw(header_bytes(), label="header"))
            spots.append(gpa)
        # Background: random descriptors and random indirect tables.
        table = data.draw(st.lists(descs(spots, NUM + 1), min_size=NUM, max_size=NUM), label="descriptors")
        for _ in range(data.draw(st.integers(0, 2), label="random indirect tables")):
            entries = data.draw(st.lists(descs(spots, 7), min_size=1, max_size=6), label="table")
            gpa = data.draw(st.integers(ARENA, END - 16 * len(entries)), label="table at")
            ram.write(gpa, b"".join(struct.pack("<QIHH", *e) for e in entries))
            spots.append(gpa)
        # Foreground: plausible request chains, direct or in an indirect table.
        free = list(range(NUM))
        heads = []
        for _ in range(data.draw(st.integers(0, 3), label="plausible chains")):
            hdr, hdr_bytes, bufs = data.draw(plausible_chain(), label="chain")
            ram.write(hdr, hdr_bytes)
            if data.draw(st.sampled_from([indirect, indirect, indirect, not indirect]), label="indirect") and free:
                gpa = data.draw(st.integers(ARENA, END - 16 * len(bufs)).map(lambda a: a & ~15), label="at")
                ram.write(gpa, b"".join(struct.pack("<QIHH", a, n, f | (N if k + 1 < len(bufs) else 0), k + 1)
                                        for k, (a, n, f) in enumerate(bufs)))
                slot = free.pop(data.draw(st.integers(0, len(free) - 1)))
                table[slot] = (gpa, 16 * len(bufs), I, 0)
                heads.append(slot)
            elif len(free) >= len(bufs):
                slots = [free.pop(data.draw(st.integers(0, len(free) - 1))) for _ in bufs]
                for k, ((a, n, f), slot) in enumerate(zip(bufs, slots)):
                    last = k + 1 == len(bufs)
                    table[slot] = (a, n, f | (0 if last else N), 0 if last else slots[k + 1])
                heads.append(slots[0])
        for _ in range(data.draw(st.integers(0, 2), label="mutations")):
            table[data.draw(st.integers(0, NUM - 1))] = data.draw(descs(spots, NUM + 1))
        for i, d in enumerate(table):
            ring.write_desc(i, *d)
        kinds = ["plausible"] * (12 if heads else 0) + ["random"] * 3 + ["bad head", "jump"]
        draw_action: dict[str, Callable[[], int]] = {
            "plausible": lambda: data.draw(st.sampled_from(heads)),
            "random": lambda: data.draw(st.integers(0, NUM - 1)),
            "bad head": lambda: data.draw(st.integers(NUM, 0xFFFF)),
            "jump": lambda: -1,
        }
        actions = []
        for _ in range(data.draw(st.integers(1, 6), label="actions")):
            kind = data.draw(st.sampled_from(kinds), label="action")
            actions.append(draw_action[kind]())

        file = bytearray(rig.file())
        last_avail, used_idx, broken, calls_expected = 0, 0, 0, True
        for action in actions:
            if action == -1:     # avail idx moves by more than the ring size
                ring.set_avail_idx(last_avail + NUM + 1)
            else:
                ring.push_avail(action)
            mem = ram_bytes(rig)
            model = Model(mem, ring.desc, ring.avail, indirect)
            ring_area = bytes(mem[: ARENA - BASE])
            try:
                chain = None if broken else model.pop(last_avail)
                code = 0
            except Err as e:
                chain, code = None, e.code
            n = rig.process()
            actual = ram_bytes(rig)
            event(f"{'P' if action in heads else 'R'} " + (f"broken {RING_ERRORS[code]}" if code else "already broken" if broken else "chain"))
            if broken or code:
                assert n == 0
                assert rig.broken == (broken or code)
                assert rig.errors() == (0 if broken else 1)
                assert actual[ARENA - BASE:] == mem[ARENA - BASE:], "memory written by a broken ring"
                assert rig.file() == bytes(file)
                assert ring.used_idx() == used_idx and rig.vring.last_avail_idx == last_avail
                broken = broken or code
                continue
            assert chain is not None
            used_len = model.blk(chain, file, readonly)
            status = actual[chain.inn[-1][0] + chain.inn[-1][1] - 1 - BASE] if chain.in_len else None
            event(f"status {status}, used_len>1: {used_len > 1}")
            assert n == 1, f"processed {n}, model expected one chain"
            assert rig.broken == 0 and rig.errors() == 0
            used_elem = struct.unpack("<II", ram.read(ring.used + 4 + 8 * (used_idx % NUM), 8))
            assert used_elem == (chain.head, used_len)
            last_avail, used_idx = (last_avail + 1) & 0xFFFF, (used_idx + 1) & 0xFFFF
            assert ring.used_idx() == used_idx and rig.vring.last_avail_idx == last_avail
            if event_idx:
                assert ring.avail_event() == last_avail
                # used_event stays 0: only the first flush after setup notifies.
                assert rig.calls() == (1 if calls_expected else 0)
                calls_expected = False
            else:
                assert ring.used_flags() == 0 and rig.calls() == 1
            assert actual[ARENA - BASE:] == model.mem[ARENA - BASE:], "guest memory differs from the model"
            # The driver's part of the ring is untouched (only the used ring is the device's).
            assert actual[: ring.used - BASE] == ring_area[: ring.used - BASE]
            assert rig.file() == bytes(file), "file differs from the model"
            assert isinstance(ram, GuardedRam) and ram.guard_intact()
    finally:
        rig.close()


@settings(max_examples=150)
@given(data=st.data(), event_idx=st.booleans(), indirect=st.booleans(), seed=st.integers(0, 2**32))
def test_random_rings_never_escape(workdir: Path, data: st.DataObject, event_idx: bool,
                                   indirect: bool, seed: int) -> None:
    import random
    rig = make_rig(workdir, event_idx, indirect, readonly=False)
    guard = GuardedRam([4096])           # a memfd outside the table: must stay untouched
    try:
        ram, ring = rig.ram, rig.ring
        ram.write(ARENA, random.Random(seed).randbytes(END - ARENA))
        anywhere = st.one_of(st.integers(BASE, END - 1), st.sampled_from(SPECIAL_ADDRS),
                             st.integers(0, U64 - 1), st.just(ring.used), st.just(ring.avail),
                             st.just(ring.desc))
        for _ in range(data.draw(st.integers(0, 3))):
            ram.write(data.draw(st.integers(BASE, END - 16)), data.draw(header_bytes()))
        for _ in range(data.draw(st.integers(0, 3))):
            entries = data.draw(st.lists(st.tuples(anywhere, st.sampled_from(LENS), st.sampled_from(FLAGS),
                                                   st.integers(0, 8)), min_size=1, max_size=8))
            ram.write(data.draw(st.integers(ARENA, END - 16 * len(entries))),
                      b"".join(struct.pack("<QIHH", *e) for e in entries))
        for i in range(NUM):
            ring.write_desc(i, data.draw(anywhere), data.draw(st.one_of(st.sampled_from(LENS), st.integers(0, 20000))),
                            data.draw(st.integers(0, 7)), data.draw(st.integers(0, NUM + 1)))
        heads = data.draw(st.lists(st.integers(0, NUM), min_size=1, max_size=NUM))
        for h in heads:
            ring.push_avail(h)
        size = rig.image.stat().st_size
        n = rig.process()
        s = rig.vring.stats()
        assert s.broken == 0 or s.broken in RING_ERRORS
        assert rig.errors() == (1 if s.broken else 0)
        assert rig.vring.used_idx == n == s.requests
        if s.broken:
            assert rig.process() == 0 and rig.vring.used_idx == n
        else:   # everything made available was consumed
            assert rig.vring.last_avail_idx == struct.unpack("<H", ram.read(ring.avail + 2, 2))[0]
        assert ram.guard_intact() if isinstance(ram, GuardedRam) else False
        assert guard.guard_intact() and bytes(guard.regions[0].map) == bytes(4096)
        assert rig.image.stat().st_size == size == SECTORS * SECTOR
    finally:
        guard.close()
        rig.close()
