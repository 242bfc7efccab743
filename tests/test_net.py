"""The C virtio-net data plane against crafted rings, without a socket or a
tap: the back-end fd is one end of a datagram socketpair, which, like a tap,
moves exactly one frame per read or write."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest

from vhostd.frontend import Buf, DriverRing, GuestRam
from vhostd.native import MemTable, NativeNet, NativeVring, lib

HDR = 12
NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_ECN = 0, 1, 3, 4, 0x80
ALL_TX = (lib.VHD_NET_GSO_CSUM | lib.VHD_NET_GSO_TCPV4 | lib.VHD_NET_GSO_TCPV6
          | lib.VHD_NET_GSO_UDP | lib.VHD_NET_GSO_ECN)


def vnet_hdr(flags: int = 0, gso_type: int = GSO_NONE, hdr_len: int = 0, gso_size: int = 0,
             csum_start: int = 0, csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


def frame(n: int, seed: int = 1) -> bytes:
    return bytes((seed * 7 + i) & 0xFF for i in range(n))


class NetRig:
    """Rings 0 (RX) and 1 (TX) of one queue pair over GuestRam, a NativeNet on
    one end of a socketpair; `peer` plays the tap's other side."""

    def __init__(self, mrg_rxbuf: bool = True, tx_gso: int = ALL_TX, num: int = 64,
                 backend_hdr: bool = True) -> None:
        self.ram = GuestRam([1 << 20, 1 << 20])
        self.mem = MemTable()
        for r in self.ram.regions:
            self.mem.add(r.fd, r.gpa, r.size, r.uva, 0)
        self.ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ours.setblocking(False)
        self.peer.setblocking(False)
        self.net = NativeNet(self.ours.fileno())
        self.net.configure(HDR, mrg_rxbuf, tx_gso, backend_hdr)
        self.backend_hdr = backend_hdr
        self.rx, self.tx = DriverRing(self.ram, 0, num), DriverRing(self.ram, 1, num)
        self.vrx, self.vtx = NativeVring(), NativeVring()
        for ring, v in ((self.rx, self.vrx), (self.tx, self.vtx)):
            v.setup(self.mem, num=num, desc=self.ram.gpa_to_uva(ring.desc),
                    avail=self.ram.gpa_to_uva(ring.avail), used=self.ram.gpa_to_uva(ring.used),
                    last_avail_idx=0, event_idx=False, indirect=True,
                    call_fd=ring.call_fd, err_fd=ring.err_fd)

    def send(self, *parts: bytes, split: int = 0) -> int:
        """Guest TX of the concatenation of parts, one descriptor per part."""
        bufs = []
        for p in parts:
            gpa = self.ram.alloc(max(len(p), 1))
            self.ram.write(gpa, p)
            bufs.append(Buf(gpa, len(p)))
        return self.tx.submit(bufs)

    def inject(self, f: bytes, hdr: bytes | None = None) -> None:
        """The tap's side sends frame f (with hdr, or an empty header, if the tap carries one)."""
        self.peer.send(((hdr or vnet_hdr()) if self.backend_hdr else b"") + f)

    def run_tx(self) -> int:
        return self.vtx.process(NativeNet.TX, self.net.ptr)

    def run_rx(self) -> int:
        return self.vrx.process(NativeNet.RX, self.net.ptr)

    def post_rx(self, *sizes: int) -> list[int]:
        """Posts one single-buffer RX chain per size; returns their GPAs."""
        gpas = []
        for n in sizes:
            gpa = self.ram.alloc(n)
            self.ram.write(gpa, b"\xee" * n)
            self.rx.submit([Buf(gpa, n, writable=True)])
            gpas.append(gpa)
        return gpas

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(1 << 17))
            except BlockingIOError:
                return out

    def close(self) -> None:
        for v in (self.vrx, self.vtx):
            v.close()
        self.net.close()
        self.mem.close()
        self.ours.close()
        self.peer.close()
        self.rx.close()
        self.tx.close()
        self.ram.close()


@pytest.fixture
def rig() -> Iterator[NetRig]:
    r = NetRig()
    yield r
    r.close()


# --- guest TX ----------------------------------------------------------------

def test_tx_frame_reaches_backend_with_header(rig: NetRig) -> None:
    f = frame(60)
    rig.send(vnet_hdr(), f)
    assert rig.run_tx() == 1
    assert rig.received() == [vnet_hdr() + f]
    assert rig.tx.take_used() == [(0, 0)]
    s = rig.net.stats()
    assert (s.tx_frames, s.tx_bytes, s.tx_bad_hdr) == (1, 60, 0)


def test_tx_header_and_frame_split_over_descriptors_and_zero_length_buffers(rig: NetRig) -> None:
    f = frame(1514)
    h = vnet_hdr()
    rig.send(h[:5], h[5:], b"", f[:100], b"", f[100:])
    rig.run_tx()
    assert rig.received() == [h + f]


def test_tx_header_fields_come_from_one_validated_copy(rig: NetRig) -> None:
    # num_buffers is meaningless on TX and is cleared in what the tap sees.
    f = frame(60)
    rig.send(vnet_hdr(num_buffers=7), f)
    rig.run_tx()
    assert rig.received() == [vnet_hdr() + f]


def test_tx_short_header_is_dropped_and_counted(rig: NetRig) -> None:
    rig.send(b"\0" * 8)
    rig.run_tx()
    assert rig.received() == []
    assert rig.net.stats().tx_bad_hdr == 1
    assert rig.tx.take_used() == [(0, 0)]


@pytest.mark.parametrize("name, hdr, tx_gso", [
    ("unknown flag", vnet_hdr(flags=0x80), ALL_TX),
    ("unknown gso type", vnet_hdr(flags=NEEDS_CSUM, gso_type=9, gso_size=1000), ALL_TX),
    ("TSO4 with gso_size 0", vnet_hdr(flags=NEEDS_CSUM, gso_type=GSO_TCPV4, gso_size=0), ALL_TX),
    ("TSO4 without NEEDS_CSUM", vnet_hdr(gso_type=GSO_TCPV4, gso_size=1448), ALL_TX),
    ("TSO4 not negotiated", vnet_hdr(flags=NEEDS_CSUM, gso_type=GSO_TCPV4, gso_size=1448,
                                     csum_start=34, csum_offset=16), lib.VHD_NET_GSO_CSUM),
    ("TSO6 not negotiated", vnet_hdr(flags=NEEDS_CSUM, gso_type=GSO_TCPV6, gso_size=1448,
                                     csum_start=54, csum_offset=16), lib.VHD_NET_GSO_CSUM),
    ("UFO not negotiated", vnet_hdr(gso_type=GSO_UDP, gso_size=1000), 0),
    ("ECN not negotiated", vnet_hdr(flags=NEEDS_CSUM, gso_type=GSO_TCPV4 | GSO_ECN, gso_size=1448,
                                    csum_start=34, csum_offset=16), lib.VHD_NET_GSO_CSUM | lib.VHD_NET_GSO_TCPV4),
    ("ECN bit without gso", vnet_hdr(gso_type=GSO_ECN), ALL_TX),
    ("NEEDS_CSUM without CSUM", vnet_hdr(flags=NEEDS_CSUM, csum_start=14, csum_offset=6), 0),
    ("checksum field past the frame", vnet_hdr(flags=NEEDS_CSUM, csum_start=50, csum_offset=16), ALL_TX),
    ("csum_start+offset overflowing 16 bits", vnet_hdr(flags=NEEDS_CSUM, csum_start=0xFFFF,
                                                       csum_offset=0xFFFF), ALL_TX),
])
def test_tx_bad_header_fields_drop_the_frame_only(name: str, hdr: bytes, tx_gso: int) -> None:
    rig = NetRig(tx_gso=tx_gso)
    try:
        rig.send(hdr, frame(60))
        good = frame(60, seed=2)
        rig.send(vnet_hdr(), good)
        assert rig.run_tx() == 2
        # The bad frame is dropped and counted; the ring goes on with the next one.
        assert rig.received() == [vnet_hdr() + good], name
        s = rig.net.stats()
        assert (s.tx_bad_hdr, s.tx_frames) == (1, 1), name
        assert rig.vtx.stats().broken == 0
    finally:
        rig.close()


def test_tx_valid_gso_frame_passes(rig: NetRig) -> None:
    h = vnet_hdr(flags=NEEDS_CSUM, gso_type=GSO_TCPV4, hdr_len=54, gso_size=1448,
                 csum_start=34, csum_offset=16)
    f = frame(9000)
    rig.send(h, f)
    rig.run_tx()
    assert rig.received() == [h + f]


# --- guest RX ----------------------------------------------------------------

def test_rx_frame_lands_in_guest_buffer_with_num_buffers(rig: NetRig) -> None:
    (gpa,) = rig.post_rx(2048)
    f = frame(100)
    rig.peer.send(vnet_hdr(flags=2) + f)
    rig.run_rx()
    assert rig.rx.take_used() == [(0, HDR + 100)]
    assert rig.ram.read(gpa, HDR + 100) == vnet_hdr(flags=2, num_buffers=1) + f
    assert rig.net.stats().rx_frames == 1


def test_rx_mergeable_frame_spans_several_buffers(rig: NetRig) -> None:
    gpas = rig.post_rx(1500, 1500, 1500, 1500)
    f = frame(5000)
    rig.peer.send(vnet_hdr() + f)
    rig.run_rx()
    used = rig.rx.take_used()
    assert [n for _, n in used] == [1500, 1500, 1500, 512]
    data = b"".join(rig.ram.read(g, n) for g, (_, n) in zip(gpas, used))
    assert data == vnet_hdr(num_buffers=4) + f


def test_rx_frame_larger_than_all_posted_buffers_is_dropped_and_buffers_kept(rig: NetRig) -> None:
    gpas = rig.post_rx(1000, 1000)
    rig.peer.send(vnet_hdr() + frame(5000))
    small = frame(60, seed=3)
    rig.peer.send(vnet_hdr() + small)
    rig.run_rx()
    s = rig.net.stats()
    assert (s.rx_dropped, s.rx_frames) == (1, 1)
    # The big frame consumed nothing; the small one took the first buffer.
    assert rig.rx.take_used() == [(0, HDR + 60)]
    assert rig.ram.read(gpas[0], HDR + 60) == vnet_hdr(num_buffers=1) + small


def test_rx_without_mrg_rxbuf_drops_a_frame_that_does_not_fit_one_chain() -> None:
    rig = NetRig(mrg_rxbuf=False)
    try:
        rig.post_rx(1000, 1000)
        rig.peer.send(vnet_hdr() + frame(1500))
        rig.run_rx()
        assert rig.net.stats().rx_dropped == 1
        assert rig.rx.take_used() == []
    finally:
        rig.close()


def test_rx_chain_with_readable_buffer_is_returned_empty(rig: NetRig) -> None:
    gpa = rig.ram.alloc(2048)
    rig.rx.submit([Buf(gpa, 2048, writable=False)])
    (good,) = rig.post_rx(2048)
    rig.peer.send(vnet_hdr() + frame(60))
    rig.run_rx()
    assert rig.rx.take_used() == [(0, 0), (1, HDR + 60)]
    assert rig.net.stats().rx_bad_desc == 1


def test_rx_chain_shorter_than_the_header_is_returned_empty(rig: NetRig) -> None:
    rig.post_rx(8)
    rig.post_rx(2048)
    rig.peer.send(vnet_hdr() + frame(60))
    rig.run_rx()
    assert rig.rx.take_used() == [(0, 0), (1, HDR + 60)]


def test_rx_waits_for_buffers_without_losing_the_frame(rig: NetRig) -> None:
    f = frame(60)
    rig.peer.send(vnet_hdr() + f)
    assert rig.run_rx() == lib.VHD_RX_STARVED
    assert rig.net.stats().rx_dropped == 0
    (gpa,) = rig.post_rx(2048)
    rig.run_rx()
    assert rig.ram.read(gpa, HDR + 60) == vnet_hdr(num_buffers=1) + f


def test_rx_zero_length_buffers_in_a_chain_are_skipped(rig: NetRig) -> None:
    a, b = rig.ram.alloc(16), rig.ram.alloc(2048)
    rig.rx.submit([Buf(a, 0, True), Buf(b, 2048, True)])
    f = frame(60)
    rig.peer.send(vnet_hdr() + f)
    rig.run_rx()
    assert rig.rx.take_used() == [(0, HDR + 60)]
    assert rig.ram.read(b, HDR + 60) == vnet_hdr(num_buffers=1) + f


def test_rx_batch_notifies_once(rig: NetRig) -> None:
    rig.post_rx(*([2048] * 8))
    for i in range(8):
        rig.peer.send(vnet_hdr() + frame(60, seed=i))
    rig.run_rx()
    assert len(rig.rx.take_used()) == 8
    assert os.eventfd_read(rig.rx.call_fd) == 1


@pytest.mark.parametrize("backend_hdr", [True, False], ids=["tap header", "raw tap"])
def test_rx_frames_of_changing_size_land_whole_across_read_modes(backend_hdr: bool) -> None:
    """Small frames are read into the back-end's cache-hot buffer and copied,
    large ones mostly straight into the chain; the mode follows the last
    frame's size.  Every frame, in either mode, arrives byte for byte, with
    RX_HOT (2048) falling inside a segment of a three-segment chain.  From a
    raw tap (no IFF_VNET_HDR) the same frames get an empty header of ours."""
    rig = NetRig(num=256, backend_hdr=backend_hdr)
    try:
        segs = (700, 1000, 2000)
        chains: dict[int, list[tuple[int, int]]] = {}
        for _ in range(60):
            bufs = [Buf(rig.ram.alloc(n), n, writable=True) for n in segs]
            for b in bufs:
                rig.ram.write(b.gpa, b"\xee" * b.len)
            chains[rig.rx.submit(bufs)] = [(b.gpa, b.len) for b in bufs]
        sizes = [60, 5000, 3000, 60, 2100, 2036, 20000, 1500, 9000, 60]
        frames = [frame(n, seed=i + 1) for i, n in enumerate(sizes)]
        for f in frames:
            rig.inject(f)
        rig.run_rx()
        used = rig.rx.take_used()
        got: list[bytes] = []
        pending = b""
        left = 0
        for head, n in used:
            data = b"".join(rig.ram.read(gpa, ln) for gpa, ln in chains[head])[:n]
            if left == 0:
                num_buffers = struct.unpack_from("<H", data, 10)[0]
                left, pending = num_buffers, b""
            pending += data
            left -= 1
            if left == 0:
                got.append(pending)
        assert got == [vnet_hdr(num_buffers=-(-(HDR + len(f)) // sum(segs))) + f for f in frames]
        assert rig.net.stats().rx_frames == len(frames)
    finally:
        rig.close()


# --- a tap without IFF_VNET_HDR (no offload negotiated) -----------------------

@pytest.fixture
def raw() -> Iterator[NetRig]:
    r = NetRig(backend_hdr=False)
    yield r
    r.close()


def test_raw_tap_tx_gets_the_frame_without_the_guest_header(raw: NetRig) -> None:
    f = frame(60)
    raw.send(vnet_hdr(num_buffers=3), f[:20], f[20:])
    raw.run_tx()
    assert raw.received() == [f]
    assert raw.net.stats().tx_frames == 1


def test_raw_tap_tx_refuses_offloads_it_cannot_pass_on(raw: NetRig) -> None:
    # ALL_TX was negotiated, but a tap without the header cannot finish a
    # partial checksum: such a frame would leave with a wrong one.
    raw.send(vnet_hdr(flags=NEEDS_CSUM, csum_start=34, csum_offset=6), frame(60))
    raw.send(vnet_hdr(), frame(61))
    raw.run_tx()
    assert raw.received() == [frame(61)]
    assert (raw.net.stats().tx_bad_hdr, raw.net.stats().tx_frames) == (1, 1)


def test_raw_tap_rx_frame_gets_an_empty_header_and_merges(raw: NetRig) -> None:
    gpas = raw.post_rx(100, 1500, 1500, 1500)
    small, big = frame(60, seed=2), frame(3000, seed=3)
    raw.inject(small)
    raw.inject(big)
    raw.run_rx()
    used = raw.rx.take_used()
    assert [n for _, n in used] == [HDR + 60, 1500, 1500, HDR + 3000 - 2 * 1500]
    assert raw.ram.read(gpas[0], HDR + 60) == vnet_hdr(num_buffers=1) + small
    data = b"".join(raw.ram.read(g, n) for g, (_, n) in zip(gpas[1:], used[1:]))
    assert data == vnet_hdr(num_buffers=3) + big
