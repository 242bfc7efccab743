"""Hostile front-ends against a real ``vhostd blk`` subprocess.

A hypothesis state machine connects over the Unix socket and sends random
sequences of valid requests (negotiation, memory tables, config reads, a
ring started for real I/O and stopped again) interleaved with malformed
ones: unknown requests, bad version flags, wrong payload sizes, oversized
headers, wrong fd counts, out-of-range ring indices, bad ring sizes, bases
and flags, unoffered features, overlapping / zero-sized / overflowing /
out-of-file memory regions, ring addresses outside memory, and randomly
mutated messages.

Checked: the daemon never dies; every malformed message ends that
connection (EOF) and nothing else; a fresh connection still negotiates
and does I/O; at the end the daemon holds no more fds than before and no
guest memory mappings, and its log has no traceback.

The guest-side counterpart (hostile rings, not messages) is fuzzed in C by
fuzz/ (tests/test_fuzz.py).  Three bugs found on the way are pinned at the
end as expected failures, at the daemon level: two guest-reachable hangs
and a front-end-reachable crash (fuzz/repro/README.md).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Union

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from vhostd.frontend import Buf, BlkDriver, DriverRing, Frontend, GuestRam, VIRTIO_BLK_S_OK
from vhostd.native import MAX_MEM_SLOTS
from vhostd.protocol.constants import (
    MAX_MEM_REGIONS,
    MAX_PAYLOAD,
    MAX_QUEUE_SIZE,
    VRING_NOFD_MASK,
    HeaderFlag,
    Request,
    VirtioFeature,
    bit,
)
from vhostd.protocol.messages import (
    SPECS,
    Fds,
    Inflight,
    MemRegion,
    MemTable,
    PayloadKind,
    U64,
    VringAddr,
    VringState,
)
from vhostd_proc import Vhostd, blk, sparse_image

V = int(HeaderFlag.VERSION)
U64_MAX = (1 << 64) - 1
EOF_TIMEOUT = 5.0
RAM_BASE = 0x10_0000
MEMFD_SIZE = 1 << 16

# An fd to attach: "event" (an eventfd) or ("mem", size) (a memfd).
FdKind = Union[str, tuple[str, int]]


@dataclass
class Msg:
    data: bytes
    fds: list[FdKind] = field(default_factory=list)


@dataclass
class Bad:
    """Valid prelude messages, then the malformed one (last)."""

    kind: str
    what: str
    msgs: list[Msg]
    fresh: bool = False      # needs a freshly negotiated connection first


def raw(request: int, payload: bytes = b"", flags: int = V, size: int | None = None) -> bytes:
    return struct.pack("<III", request, flags, len(payload) if size is None else size) + payload


def req(request: Request, payload: bytes = b"", fds: list[FdKind] | None = None) -> Msg:
    return Msg(raw(request, payload), fds or [])


def open_fd(kind: FdKind) -> int:
    if kind == "event":
        return os.eventfd(0, os.EFD_CLOEXEC)
    assert isinstance(kind, tuple) and kind[0] == "mem"
    fd = os.memfd_create("fuzz-proto", os.MFD_CLOEXEC)
    os.ftruncate(fd, kind[1])
    return fd


def send(fe: Frontend, m: Msg) -> None:
    fds = [open_fd(k) for k in m.fds]
    try:
        fe.send_raw(m.data, fds)
    finally:
        for fd in fds:
            os.close(fd)


def wait_eof(sock: socket.socket, timeout: float = EOF_TIMEOUT) -> bool:
    """True once the peer closed (EOF or reset); data before it is skipped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if sock.recv(4096) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


# --- malformed messages ---------------------------------------------------------

NO_FD_VALID = [
    req(Request.GET_FEATURES), req(Request.GET_QUEUE_NUM), req(Request.SET_OWNER),
    req(Request.GET_PROTOCOL_FEATURES), req(Request.GET_MAX_MEM_SLOTS),
    req(Request.GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8)),
    req(Request.SET_VRING_NUM, VringState(0, 64).pack()),
]
RING_STATE_REQUESTS = [Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
                       Request.SET_VRING_ENABLE]
RING_FD_REQUESTS = [Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR]
UNSUPPORTED = [r for r in Request if r not in SPECS]


def zeros_payload(r: Request) -> bytes:
    """A payload of an accepted size (content not necessarily valid)."""
    kind = SPECS[r].payload
    if kind is PayloadKind.NONE:
        return b""
    if kind is PayloadKind.MEM_TABLE:
        return bytes(8)
    if kind is PayloadKind.CONFIG:
        return bytes(12)
    return bytes(kind.value._S.size)


@st.composite
def unknown_request(draw: st.DrawFn) -> Bad:
    code = draw(st.one_of(st.just(0), st.sampled_from(UNSUPPORTED), st.integers(max(Request) + 1, 2**32 - 1)))
    return Bad("unknown_request", f"request {code}", [Msg(raw(code, bytes(draw(st.integers(0, 40)))))])


@st.composite
def bad_flags(draw: st.DrawFn) -> Bad:
    flags = draw(st.integers(0, 2**32 - 1).filter(lambda f: f & 3 != V or f & HeaderFlag.REPLY))
    return Bad("bad_flags", f"flags {flags:#x}", [Msg(raw(Request.GET_QUEUE_NUM, flags=flags))])


@st.composite
def wrong_size(draw: st.DrawFn) -> Bad:
    r = draw(st.sampled_from(sorted(SPECS)))
    size = draw(st.integers(0, 300).filter(lambda n: not SPECS[r].payload.size_ok(n)))
    payload = draw(st.binary(min_size=size, max_size=size))
    return Bad("wrong_size", f"{r.name} with {size} payload bytes", [Msg(raw(r, payload))])


@st.composite
def too_big(draw: st.DrawFn) -> Bad:
    r = draw(st.sampled_from(sorted(SPECS)))
    size = draw(st.integers(MAX_PAYLOAD + 1, 2**32 - 1))
    return Bad("too_big", f"{r.name} header saying {size} bytes", [Msg(raw(r, size=size))])


@st.composite
def wrong_fds(draw: st.DrawFn) -> Bad:
    case = draw(st.sampled_from(["none", "vring", "mem", "one", "too-many"]))
    if case == "none":
        m = draw(st.sampled_from(NO_FD_VALID))
        n = draw(st.integers(1, MAX_MEM_REGIONS))
        return Bad(f"wrong_fds: {case}", f"{n} fds on a request that takes none", [Msg(m.data, ["event"] * n)])
    if case == "vring":
        r = draw(st.sampled_from(RING_FD_REQUESTS))
        nofd = draw(st.booleans())
        n = draw(st.sampled_from([1, 2, 3] if nofd else [0, 2, 3]))
        value = VRING_NOFD_MASK if nofd else 0
        return Bad(f"wrong_fds: {case}", f"{r.name} nofd={nofd} with {n} fds",
                   [req(r, U64(value).pack(), ["event"] * n)])
    if case == "mem":
        regions = draw(st.integers(0, MAX_MEM_REGIONS))
        n = draw(st.integers(0, MAX_MEM_REGIONS).filter(lambda k: k != regions))
        table = MemTable(tuple(MemRegion(RAM_BASE + i * MEMFD_SIZE, MEMFD_SIZE, 0x7000_0000_0000 + i * MEMFD_SIZE, 0)
                               for i in range(regions)))
        return Bad(f"wrong_fds: {case}", f"{regions} regions with {n} fds",
                   [req(Request.SET_MEM_TABLE, table.pack(), [("mem", MEMFD_SIZE)] * n)])
    if case == "one":
        ones = sorted(r for r, s in SPECS.items() if s.fds is Fds.ONE)
        if not ones:
            return draw(wrong_fds())
        r = draw(st.sampled_from(ones))
        n = draw(st.sampled_from([0, 2]))
        return Bad(f"wrong_fds: {case}", f"{r.name} with {n} fds", [req(r, zeros_payload(r), ["event"] * n)])
    n = draw(st.integers(MAX_MEM_REGIONS + 1, MAX_MEM_REGIONS + 4))
    m = draw(st.sampled_from(NO_FD_VALID))
    return Bad(f"wrong_fds: {case}", f"{n} fds (control data truncated)", [Msg(m.data, ["event"] * n)])


@st.composite
def bad_ring_request(draw: st.DrawFn, queues: int) -> Bad:
    case = draw(st.sampled_from(["index", "fd-index", "reserved", "num", "base", "enable", "addr-flags"]))
    if case == "index":
        index = draw(st.integers(queues, 2**32 - 1))
        r = draw(st.sampled_from(RING_STATE_REQUESTS + [Request.SET_VRING_ADDR]))
        payload = (VringAddr(index, 0, 0, 0, 0, 0).pack() if r is Request.SET_VRING_ADDR
                   else VringState(index, 1 if r is Request.SET_VRING_ENABLE else 64).pack())
        return Bad(f"bad_ring_request: {case}", f"{r.name} ring {index}", [req(r, payload)])
    if case == "fd-index":
        index = draw(st.integers(queues, 0xFF))
        r = draw(st.sampled_from(RING_FD_REQUESTS))
        return Bad(f"bad_ring_request: {case}", f"{r.name} ring {index}",
                   [req(r, U64(index | VRING_NOFD_MASK).pack())])
    if case == "reserved":
        value = draw(st.integers(0, U64_MAX).filter(lambda v: v & ~0x1FF))
        r = draw(st.sampled_from(RING_FD_REQUESTS))
        fds: list[FdKind] = [] if value & VRING_NOFD_MASK else ["event"]
        return Bad(f"bad_ring_request: {case}", f"{r.name} {value:#x}", [req(r, U64(value).pack(), fds)])
    if case == "num":
        n = draw(st.one_of(st.just(0), st.integers(MAX_QUEUE_SIZE + 1, 2**32 - 1),
                           st.integers(3, MAX_QUEUE_SIZE).filter(lambda k: k & (k - 1))))
        return Bad(f"bad_ring_request: {case}", f"ring size {n}",
                   [req(Request.SET_VRING_NUM, VringState(0, n).pack())])
    if case == "base":
        n = draw(st.integers(0x10000, 2**32 - 1))
        return Bad(f"bad_ring_request: {case}", f"ring base {n}",
                   [req(Request.SET_VRING_BASE, VringState(0, n).pack())])
    if case == "enable":
        n = draw(st.integers(2, 2**32 - 1))
        return Bad(f"bad_ring_request: {case}", f"enable {n}",
                   [req(Request.SET_VRING_ENABLE, VringState(0, n).pack())])
    flags = draw(st.integers(2, 2**32 - 1))
    return Bad(f"bad_ring_request: {case}", f"ring address flags {flags:#x}",
               [req(Request.SET_VRING_ADDR, VringAddr(0, flags, 0, 0, 0, 0).pack())])


@st.composite
def unoffered_features(draw: st.DrawFn, offered: int, offered_proto: int) -> Bad:
    proto = draw(st.booleans())
    have = offered_proto if proto else offered
    extra = draw(st.integers(1, U64_MAX).filter(lambda v: v & ~have))
    r = Request.SET_PROTOCOL_FEATURES if proto else Request.SET_FEATURES
    return Bad("unoffered_features", f"{r.name} {have | extra:#x}", [req(r, U64(have | extra).pack())])


@st.composite
def bad_mem_table(draw: st.DrawFn) -> Bad:
    """A table with exactly one thing wrong; as many memfds as regions."""
    size = draw(st.sampled_from([4096, 8192, MEMFD_SIZE]))
    good = MemRegion(RAM_BASE, size, 0x7000_0000_0000, 0)
    case = draw(st.sampled_from(["gpa-overlap", "uva-overlap", "zero", "gpa-overflow", "uva-overflow",
                                 "offset-overflow", "past-file", "count"]))
    second: MemRegion
    if case == "gpa-overlap":
        delta = draw(st.integers(-size + 1, size - 1))
        second = MemRegion(RAM_BASE + delta, size, 0x7100_0000_0000, 0)
    elif case == "uva-overlap":
        delta = draw(st.integers(-size + 1, size - 1))
        second = MemRegion(RAM_BASE + 0x1000_0000, size, 0x7000_0000_0000 + delta, 0)
    elif case == "zero":
        second = MemRegion(RAM_BASE + 0x1000_0000, 0, 0x7100_0000_0000, 0)
    elif case == "gpa-overflow":
        gpa = draw(st.integers(U64_MAX - size + 1, U64_MAX))
        second = MemRegion(gpa, size, 0x7100_0000_0000, 0)
    elif case == "uva-overflow":
        uva = draw(st.integers(U64_MAX - size + 1, U64_MAX))
        second = MemRegion(RAM_BASE + 0x1000_0000, size, uva, 0)
    elif case == "offset-overflow":
        off = draw(st.integers(U64_MAX - size + 1, U64_MAX))
        second = MemRegion(RAM_BASE + 0x1000_0000, size, 0x7100_0000_0000, off)
    elif case == "past-file":
        off = draw(st.integers(MEMFD_SIZE - size + 1, 2**40))
        second = MemRegion(RAM_BASE + 0x1000_0000, size, 0x7100_0000_0000, off)
    else:
        # The count field disagrees with the payload (or exceeds the maximum).
        n = draw(st.integers(0, 2**32 - 1).filter(lambda k: k != 1))
        payload = struct.pack("<II", n, 0) + good.pack()
        return Bad(f"bad_mem_table: {case}", f"memory table saying {n} regions, carrying 1",
                   [req(Request.SET_MEM_TABLE, payload, [("mem", MEMFD_SIZE)])])
    regions = (good, second) if draw(st.booleans()) else (second, good)
    return Bad(f"bad_mem_table: {case}", f"memory table {case}: {regions}",
               [req(Request.SET_MEM_TABLE, MemTable(regions).pack(), [("mem", MEMFD_SIZE)] * 2)])


@st.composite
def bad_ring_addresses(draw: st.DrawFn) -> Bad:
    """A ring whose address cannot work: it fails when the ring starts."""
    uva = 0x7000_0000_0000
    num = draw(st.sampled_from([8, 64, 256]))
    addrs = [uva, uva + 16 * num, uva + 16 * num + 8 + 2 * num]    # desc, avail, used: all fine
    which = draw(st.integers(0, 2))
    case = draw(st.sampled_from(["outside", "straddles-end", "overflow", "misaligned"]))
    if case == "outside":
        addrs[which] = draw(st.one_of(st.integers(0, uva - 0x10000), st.integers(uva + MEMFD_SIZE, U64_MAX)))
    elif case == "straddles-end":
        addrs[which] = uva + MEMFD_SIZE - draw(st.integers(1, 8))
    elif case == "overflow":
        addrs[which] = U64_MAX - draw(st.integers(0, 64))
    else:
        align = [16, 2, 4][which]
        addrs[which] += draw(st.integers(1, align - 1))
    table = MemTable((MemRegion(RAM_BASE, MEMFD_SIZE, uva, 0),))
    msgs = [
        req(Request.SET_MEM_TABLE, table.pack(), [("mem", MEMFD_SIZE)]),
        req(Request.SET_VRING_NUM, VringState(0, num).pack()),
        req(Request.SET_VRING_BASE, VringState(0, 0).pack()),
        req(Request.SET_VRING_ADDR, VringAddr(0, 0, addrs[0], addrs[2], addrs[1], 0).pack()),
        req(Request.SET_VRING_CALL, U64(0).pack(), ["event"]),
        req(Request.SET_VRING_KICK, U64(0).pack(), ["event"]),
        req(Request.SET_VRING_ENABLE, VringState(0, 1).pack()),
    ]
    part = ["desc", "avail", "used"][which]
    return Bad(f"bad_ring_addresses: {case}", f"ring of {num} with {part} {case} ({addrs[which]:#x})", msgs,
               fresh=True)


# --- the state machine -------------------------------------------------------------

class HostileFrontend(RuleBasedStateMachine):
    daemon: ClassVar[Vhostd]
    offered: ClassVar[int] = 0
    offered_proto: ClassVar[int] = 0
    queues: ClassVar[int] = 1
    stats: ClassVar[dict[str, int]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.fe: Frontend | None = None
        self.negotiated = False
        self.rams: list[GuestRam] = []

    # --- helpers ---

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def connect(self) -> Frontend:
        """A new connection; the daemon refuses one while the previous
        session is still being torn down, so retry for a while."""
        deadline = time.monotonic() + 10
        while True:
            fe = Frontend(str(self.daemon.socket))
            try:
                assert fe.get_u64(Request.GET_QUEUE_NUM) == self.queues
                return fe
            except (ConnectionError, OSError):
                fe.close()
                assert self.daemon.alive(), f"vhostd died:\n{self.daemon.log()[-3000:]}"
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def reconnect(self) -> None:
        if self.fe is not None:
            self.fe.close()
        self.close_rams()
        self.fe = self.connect()
        self.negotiated = False

    def negotiate(self) -> None:
        assert self.fe is not None
        features, proto = self.fe.negotiate(U64_MAX, U64_MAX)   # split rings (DriverRing)
        assert (features, proto) == (self.offered & ~bit(VirtioFeature.RING_PACKED), self.offered_proto)
        self.negotiated = True

    def close_rams(self) -> None:
        for r in self.rams:
            r.close()
        self.rams = []

    # --- lifecycle ---

    @initialize()
    def start(self) -> None:
        self.fe = self.connect()
        if not type(self).offered:
            type(self).offered = self.fe.get_u64(Request.GET_FEATURES)
            type(self).offered_proto = self.fe.get_u64(Request.GET_PROTOCOL_FEATURES)

    def teardown(self) -> None:
        if self.fe is not None:
            self.fe.close()
        self.close_rams()

    @invariant()
    def daemon_alive(self) -> None:
        assert self.daemon.alive(), f"vhostd died:\n{self.daemon.log()[-3000:]}"

    # --- valid requests ---

    @rule()
    def queries(self) -> None:
        assert self.fe is not None
        assert self.fe.get_u64(Request.GET_FEATURES) == self.offered
        assert self.fe.get_u64(Request.GET_PROTOCOL_FEATURES) == self.offered_proto
        assert self.fe.get_u64(Request.GET_QUEUE_NUM) == self.queues
        assert self.fe.get_u64(Request.GET_MAX_MEM_SLOTS) == MAX_MEM_SLOTS
        self.count("valid: queries")

    @rule(want=st.integers(0, U64_MAX), want_proto=st.integers(0, U64_MAX))
    def negotiate_subset(self, want: int, want_proto: int) -> None:
        assert self.fe is not None
        features, proto = self.fe.negotiate(want, want_proto)
        assert features == self.offered & want & ~bit(VirtioFeature.RING_PACKED)
        assert proto == self.offered_proto & want_proto
        assert self.fe.get_u64(Request.GET_QUEUE_NUM) == self.queues   # processed, still connected
        self.negotiated = False
        self.count("valid: negotiate subset")

    @rule(sizes=st.lists(st.sampled_from([4096, 65536, 1 << 20]), min_size=1, max_size=3))
    def set_mem_table(self, sizes: list[int]) -> None:
        assert self.fe is not None
        ram = GuestRam(sizes)
        self.rams.append(ram)
        self.fe.set_mem_table(ram)
        assert self.fe.get_u64(Request.GET_QUEUE_NUM) == self.queues
        self.count("valid: memory table")

    @rule(offset=st.integers(0, 2**32 - 1), size=st.integers(0, 256))
    def get_config(self, offset: int, size: int) -> None:
        assert self.fe is not None
        assert len(self.fe.get_config(size, offset)) == size
        self.count("valid: config")

    @rule(sector=st.integers(0, 2047), indirect=st.booleans(), num=st.sampled_from([1, 16, 256]))
    def io(self, sector: int, indirect: bool, num: int) -> None:
        """A ring started for real: write, read back, stop it again."""
        assert self.fe is not None
        if not self.negotiated:
            self.negotiate()
        ram = GuestRam([1 << 20])
        self.rams.append(ram)
        self.fe.set_mem_table(ram)
        ring = DriverRing(ram, 0, num, event_idx=bool(self.offered & bit(VirtioFeature.RING_EVENT_IDX)))
        try:
            self.fe.start_ring(ring)
            drv = BlkDriver(ring)
            data = os.urandom(512)
            indirect = indirect or num < 3     # a request takes three descriptors
            assert drv.write(sector, data, indirect=indirect).status == VIRTIO_BLK_S_OK
            r = drv.read(sector, 512, indirect=indirect)
            assert (r.status, r.data) == (VIRTIO_BLK_S_OK, data)
            assert self.fe.get_vring_base(0) == ring.avail_idx
        finally:
            ring.close()
        self.count("valid: I/O")

    # --- malformed messages ---

    def expect_closed(self, bad: Bad) -> None:
        assert self.fe is not None
        if bad.fresh:
            self.reconnect()
            self.negotiate()
        for m in bad.msgs:
            try:
                send(self.fe, m)
            except (BrokenPipeError, ConnectionResetError):
                break   # closed already (by the last message, or a too-eager prelude)
        assert wait_eof(self.fe.sock), f"connection still open after {bad.what}"
        self.count("bad " + bad.kind)
        self.reconnect()
        self.negotiate()    # a fresh connection still works

    @rule(bad=st.one_of(unknown_request(), bad_flags(), wrong_size(), too_big(), wrong_fds(), bad_mem_table(),
                        bad_ring_addresses()))
    def malformed(self, bad: Bad) -> None:
        self.expect_closed(bad)

    @rule(data=st.data())
    def malformed_state(self, data: st.DataObject) -> None:
        """Ring and feature errors (they depend on the device)."""
        self.expect_closed(data.draw(st.one_of(bad_ring_request(self.queues),
                                               unoffered_features(self.offered, self.offered_proto))))

    @rule(base=st.sampled_from(NO_FD_VALID + [req(Request.SET_FEATURES, U64(0).pack()),
                                              req(Request.SET_VRING_BASE, VringState(0, 0).pack())]),
          flips=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 255)), min_size=1, max_size=4))
    def mutated(self, base: Msg, flips: list[tuple[int, int]]) -> None:
        """Random bytes changed: closed or not, the next connection works."""
        assert self.fe is not None
        data = bytearray(base.data)
        for pos, value in flips:
            data[pos % len(data)] = value
        try:
            send(self.fe, Msg(bytes(data), base.fds))
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.count("mutated")
        self.reconnect()


@pytest.fixture(scope="module")
def blk_daemon() -> Iterator[Vhostd]:
    tmp = Path(tempfile.mkdtemp(prefix="vhd-fz-"))    # short: socket paths are limited to 108 bytes
    image = sparse_image(tmp / "disk.img", 1 << 20)
    d = blk(tmp, image)
    try:
        yield d
    finally:
        alive = d.alive()
        rc: int | None = None
        try:
            rc = d.stop(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
        assert alive, "vhostd died"
        assert rc == 0, f"vhostd exited {rc} on SIGTERM"


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def memfd_maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum("memfd:" in ln for ln in f)


def test_hostile_message_sequences(blk_daemon: Vhostd) -> None:
    d = blk_daemon
    pid = d.proc.pid
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    HostileFrontend.daemon = d
    HostileFrontend.offered = HostileFrontend.offered_proto = 0    # learnt from this daemon
    HostileFrontend.stats = {}
    run_state_machine_as_test(HostileFrontend, settings=settings(
        max_examples=int(os.environ.get("VHOSTD_FUZZ_EXAMPLES", "100")), stateful_step_count=20, deadline=None,
        suppress_health_check=list(HealthCheck), print_blob=True))
    print("\nmessages sent:", ", ".join(f"{k} {v}" for k, v in sorted(HostileFrontend.stats.items())))
    assert d.alive()
    # Every session is gone: its fds closed and guest memory unmapped.
    assert wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) <= fds_before), \
        f"vhostd holds {len(os.listdir(f'/proc/{pid}/fd'))} fds, {fds_before} before"
    assert wait_for(lambda: memfd_maps(pid) == 0), f"{memfd_maps(pid)} guest memory mappings left"
    assert "Traceback" not in d.log(), d.log()[-5000:]


# --- known bugs the fuzzers found, at the daemon level ----------------------------
#
# Each is an expected failure until fixed (strict: a fix makes the test pass
# and the marker must go).  See fuzz/repro/README.md.

@contextmanager
def own_daemon(*args: str) -> Iterator[Vhostd]:
    """`vhostd ARGS` for one test (blk: on a 1 MiB image); SIGKILLed if
    SIGTERM does not stop it at once."""
    tmp = Path(tempfile.mkdtemp(prefix="vhd-fz-"))
    sock = tmp / "d.sock"
    if args[0] == "blk":
        args += ("--file", str(sparse_image(tmp / "disk.img", 1 << 20)))
    d = Vhostd([*args, "--socket-path", str(sock)], sock, tmp / "d.log")
    try:
        yield d
    finally:
        if d.alive():
            d.proc.send_signal(signal.SIGTERM)
            try:
                d.proc.wait(1)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait()
        d.stop()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


def replies_to_stop(fe: Frontend, index: int, timeout: float = 2.0) -> bool:
    """GET_VRING_BASE (QEMU sends it whenever a guest stops or reboots) answered in time?"""
    fe.send(Request.GET_VRING_BASE, VringState(index, 0).pack())
    fe.sock.settimeout(timeout)
    try:
        fe.recv_reply(Request.GET_VRING_BASE)
        return True
    except TimeoutError:
        return False
    finally:
        fe.sock.settimeout(10)


def stops_on_sigterm(d: Vhostd, timeout: float = 3.0) -> bool:
    d.proc.send_signal(signal.SIGTERM)
    try:
        return d.proc.wait(timeout) == 0
    except subprocess.TimeoutExpired:
        return False


def test_guest_ring_layout_cannot_wedge_the_worker() -> None:
    with own_daemon("blk") as d:
        fe = Frontend(str(d.socket))
        fe.negotiate(U64_MAX, U64_MAX)
        ram = GuestRam([1 << 16])
        fe.set_mem_table(ram)
        desc, avail = ram.alloc(16 * 4, 16), ram.alloc(64, 4)
        ram.write(desc, struct.pack("<QIHH", RAM_BASE + 0x8000, 0, 0, 0))   # head 0: an empty buffer
        ram.write(avail, struct.pack("<HH", 0, 1))     # avail->idx 1, and so used->idx 1
        kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)
        uva = ram.gpa_to_uva(avail)
        fe.send(Request.SET_VRING_NUM, VringState(0, 4).pack())
        fe.send(Request.SET_VRING_BASE, VringState(0, 0).pack())
        fe.send(Request.SET_VRING_ADDR, VringAddr(0, 0, ram.gpa_to_uva(desc), uva, uva, 0).pack())  # used = avail
        fe.send(Request.SET_VRING_CALL, U64(0).pack(), [call])
        fe.send(Request.SET_VRING_KICK, U64(0).pack(), [kick])
        fe.send(Request.SET_VRING_ENABLE, VringState(0, 1).pack())
        os.eventfd_write(kick, 1)
        time.sleep(0.2)
        try:
            assert replies_to_stop(fe, 0), "GET_VRING_BASE not answered: the ring worker is stuck"
            fe.close()
            assert stops_on_sigterm(d), "vhostd did not stop on SIGTERM"
        finally:
            fe.close()
            os.close(kick)
            os.close(call)
            ram.close()


def test_null_net_rx_with_small_buffer_does_not_wedge() -> None:
    with own_daemon("net", "--backend", "null", "--name", "net0") as d:
        fe = Frontend(str(d.socket))
        mrg_rxbuf = 15
        fe.negotiate(U64_MAX & ~bit(mrg_rxbuf), U64_MAX)
        ram = GuestRam([1 << 16])
        fe.set_mem_table(ram)
        rx, tx = DriverRing(ram, 0, 8), DriverRing(ram, 1, 8)
        try:
            fe.start_ring(rx)
            fe.start_ring(tx)
            rx.submit([Buf(ram.alloc(20), 20, writable=True)])   # a header fits, the 60-byte frame not
            rx.kick()
            time.sleep(0.2)
            assert replies_to_stop(fe, 0), "GET_VRING_BASE not answered: the RX worker is stuck"
            fe.close()
            assert stops_on_sigterm(d), "vhostd did not stop on SIGTERM"
        finally:
            fe.close()
            rx.close()
            tx.close()
            ram.close()


def test_ring_bigger_than_inflight_buffer_is_refused() -> None:
    with own_daemon("blk") as d:
        fe = Frontend(str(d.socket))
        fe.negotiate(U64_MAX, U64_MAX)
        fe.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, 1, 1).pack())     # one queue of size 1
        _, fds = fe.recv_reply_fds(Request.GET_INFLIGHT_FD)
        for fd in fds:
            os.close(fd)
        ram = GuestRam([1 << 20])
        fe.set_mem_table(ram)
        ring = DriverRing(ram, 0, MAX_QUEUE_SIZE)
        try:
            try:
                fe.start_ring(ring)
            except (BrokenPipeError, ConnectionResetError):
                pass      # refused: fine
            wait_eof(fe.sock, 1.0)
            assert not wait_for(lambda: not d.alive(), 1.0), f"vhostd died (rc {d.proc.poll()})"
            fe.close()
            fresh = Frontend(str(d.socket))
            assert fresh.get_u64(Request.GET_QUEUE_NUM) == 1
            fresh.close()
        finally:
            fe.close()
            ring.close()
            ram.close()
