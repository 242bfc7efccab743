"""vhostd net with a real tap in a test network namespace, driven by the
Python front-end: frames both ways with both header sizes, offloads that
follow negotiation, RARP, link status, attach vs create, bridge."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vhostd_proc
from netns import NetNs
from vhostd import control
from vhostd.frontend import Buf, DriverRing, Frontend, GuestRam, NetDriver
from vhostd.protocol.constants import ProtocolFeature, Request, VirtioFeature, bit
from vhostd.protocol.messages import U64

pytestmark = pytest.mark.root

PKTIO = str(Path(__file__).with_name("pktio.py"))
TAP = "vtap0"
GUEST_MAC = bytes.fromhex("525400aabbcc")
PROTO = (bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
         | bit(ProtocolFeature.RARP) | bit(ProtocolFeature.NET_MTU))
# virtio-net feature bits used here.
CSUM, GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, HOST_TSO4, MRG_RXBUF = 0, 1, 7, 8, 11, 15
RING_FEATURES = bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES) | bit(VirtioFeature.RING_EVENT_IDX)


def start(tmp: Path, ns: NetNs, *args: str) -> vhostd_proc.Vhostd:
    sock = tmp / "net.sock"
    return vhostd_proc.Vhostd(["net", "--socket-path", str(sock), "--tap", TAP, *args], sock,
                              tmp / "net.log", prefix=ns.cmd([]))


class Guest:
    """A front-end with one queue pair set up."""

    def __init__(self, sock: Path, features: int) -> None:
        self.fe = Frontend(str(sock))
        self.features, _ = self.fe.negotiate(features, PROTO)
        self.ram = GuestRam([4 << 20])
        self.fe.set_mem_table(self.ram)
        rx, tx = DriverRing(self.ram, 0, 64), DriverRing(self.ram, 1, 64)
        self.fe.start_ring(rx)
        self.fe.start_ring(tx)
        legacy = not features & bit(VirtioFeature.VERSION_1) and not features & bit(MRG_RXBUF)
        self.net = NetDriver(rx, tx, hdr_len=10 if legacy else 12)

    def close(self) -> None:
        self.fe.close()


def capture(ns: NetNs, seconds: float, ethertype: str | None = None) -> subprocess.Popen[str]:
    p = ns.popen([sys.executable, PKTIO, "capture", TAP, str(seconds), *([ethertype] if ethertype else [])],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "READY"
    return p


def frames_of(p: subprocess.Popen[str]) -> list[bytes]:
    out, _ = p.communicate(timeout=30)
    return [bytes.fromhex(line) for line in out.split()]


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack(">H", ethertype) + payload


@pytest.mark.parametrize("version_1", [True, False], ids=["12-byte header", "legacy 10-byte header"])
def test_frames_both_ways(tmp_path: Path, ns: NetNs, version_1: bool) -> None:
    v = start(tmp_path, ns)
    feats = RING_FEATURES | (bit(VirtioFeature.VERSION_1) if version_1 else 0)
    g = Guest(v.listening_socket, feats)
    try:
        # guest TX -> tap
        cap = capture(ns, 2, "88b5")
        out = eth(b"\xff" * 6, GUEST_MAC, 0x88B5, b"vhostd-tx" + bytes(40))
        g.net.send(out)
        g.net.tx.wait_used(1)
        assert out in frames_of(cap)
        # tap -> guest RX (plenty of buffers: the kernel's own IPv6 frames take some)
        g.net.post_rx(48)
        inject = eth(GUEST_MAC, bytes.fromhex("020000000001"), 0x88B5, b"vhostd-rx" + bytes(40))
        ns.run([sys.executable, PKTIO, "send", TAP, inject.hex()])
        # The kernel may send its own frames (IPv6 autoconf) out of the tap too.
        got: dict[bytes, bytes] = {}
        deadline = time.monotonic() + 5
        while inject not in got and time.monotonic() < deadline:
            got.update((f, h) for h, f in g.net.recv(1))
        hdr = got[inject]
        assert len(hdr) == g.net.hdr_len
        if version_1:
            assert struct.unpack_from("<H", hdr, 10)[0] == 1   # num_buffers
    finally:
        g.close()
        v.stop()


def _offloads(ns: NetNs) -> dict[str, str]:
    out = ns.run(["ethtool", "-k", TAP]).stdout
    return {k.strip(): v.split()[0] for k, v in (l.split(":", 1) for l in out.splitlines() if ":" in l) if v.strip()}


def _offloads_become(ns: NetNs, value: str, timeout: float = 5.0) -> dict[str, str]:
    """The tap's offloads once they read `value` (SET_FEATURES is not
    acknowledged: the daemon applies it a moment after the front-end sent it)."""
    deadline = time.monotonic() + timeout
    while True:
        got = _offloads(ns)
        if got["tx-checksumming"] == value and got["tcp-segmentation-offload"] == value:
            return got
        assert time.monotonic() < deadline, got
        time.sleep(0.05)


def test_tap_offloads_follow_negotiated_features(tmp_path: Path, ns: NetNs) -> None:
    v = start(tmp_path, ns)
    try:
        g = Guest(v.listening_socket, RING_FEATURES | bit(VirtioFeature.VERSION_1) | bit(CSUM)
                  | bit(GUEST_CSUM) | bit(GUEST_TSO4) | bit(GUEST_TSO6) | bit(HOST_TSO4))
        _offloads_become(ns, "on")
        g.close()
        g = Guest(v.listening_socket, RING_FEATURES | bit(VirtioFeature.VERSION_1))
        _offloads_become(ns, "off")
        g.close()
    finally:
        v.stop()


def _tun_flags(ns: NetNs) -> int:
    return int(ns.run(["cat", f"/sys/class/net/{TAP}/tun_flags"]).stdout, 16)


IFF_PERSIST, IFF_VNET_HDR = 0x0800, 0x4000


def _tun_flags_settle(ns: NetNs, vnet_hdr: bool, timeout: float = 5.0) -> int:
    """The tap's flags once the header is as expected and the temporary
    IFF_PERSIST of the reattach is gone (SET_FEATURES is not acknowledged:
    the daemon reattaches the queues a moment after the front-end sent it)."""
    deadline = time.monotonic() + timeout
    while True:
        flags = _tun_flags(ns)
        if bool(flags & IFF_VNET_HDR) == vnet_hdr and not flags & IFF_PERSIST:
            return flags
        assert time.monotonic() < deadline, hex(flags)
        time.sleep(0.05)


def test_tap_carries_the_header_only_while_an_offload_is_negotiated(tmp_path: Path, ns: NetNs) -> None:
    """Without offloads the tap is reattached without IFF_VNET_HDR (cheaper
    reads); the device keeps its bridge port and MTU through that, is not
    left persistent, and gets the header back for the next front-end."""
    ns.run(["ip", "link", "add", "br0", "type", "bridge"])
    v = start(tmp_path, ns, "--bridge", "br0", "--mtu", "4000", "--queue-pairs", "2")
    try:
        assert _tun_flags(ns) & IFF_VNET_HDR
        g = Guest(v.listening_socket, RING_FEATURES | bit(VirtioFeature.VERSION_1))
        try:
            _tun_flags_settle(ns, vnet_hdr=False)
            link = ns.run(["ip", "-o", "link", "show", TAP]).stdout
            assert "master br0" in link and "mtu 4000" in link and ",UP" in link, link
            cap = capture(ns, 2, "88b5")
            out = eth(b"\xff" * 6, GUEST_MAC, 0x88B5, b"raw-tx" + bytes(40))
            g.net.send(out)
            g.net.tx.wait_used(1)
            assert out in frames_of(cap)
        finally:
            g.close()
        g = Guest(v.listening_socket, RING_FEATURES | bit(VirtioFeature.VERSION_1) | bit(CSUM) | bit(GUEST_CSUM))
        g.close()
        _tun_flags_settle(ns, vnet_hdr=True)
    finally:
        v.stop()
    assert TAP not in ns.run(["ip", "-o", "link", "show"]).stdout


def test_send_rarp_announces_the_mac_on_the_tap(tmp_path: Path, ns: NetNs) -> None:
    v = start(tmp_path, ns)
    g = Guest(v.listening_socket, RING_FEATURES | bit(VirtioFeature.VERSION_1))
    try:
        cap = capture(ns, 2, "8035")
        g.fe.send(Request.SEND_RARP, U64(int.from_bytes(GUEST_MAC + b"\0\0", "little")).pack())
        frames = frames_of(cap)
        assert len(frames) == 1, frames
        f = frames[0]
        assert f[:6] == b"\xff" * 6 and f[6:12] == GUEST_MAC
        assert f[20:22] == b"\x00\x03"           # RARP request (reverse request)
        assert f[22:28] == GUEST_MAC and f[32:38] == GUEST_MAC
    finally:
        g.close()
        v.stop()


def test_config_link_status_follows_the_tap_and_mac(tmp_path: Path, ns: NetNs) -> None:
    v = start(tmp_path, ns, "--mac", "52:54:00:aa:bb:cc", "--queue-pairs", "2")
    g = Guest(v.listening_socket, RING_FEATURES | bit(VirtioFeature.VERSION_1))
    try:
        cfg = g.fe.get_config(12)
        mac, status, pairs, mtu = struct.unpack("<6sHHH", cfg)
        assert (mac, status, pairs, mtu) == (GUEST_MAC, 1, 2, 1500)
        assert g.fe.get_u64(Request.GET_QUEUE_NUM) == 2
        ns.run(["ip", "link", "set", TAP, "down"])
        assert struct.unpack("<6sH", g.fe.get_config(8))[1] == 0
    finally:
        g.close()
        v.stop()


def test_created_tap_is_removed_and_attached_tap_is_kept(tmp_path: Path, ns: NetNs) -> None:
    def exists(name: str) -> bool:
        return name in ns.run(["ip", "-o", "link", "show"]).stdout

    v = start(tmp_path, ns)
    assert exists(TAP)
    v.stop()
    assert not exists(TAP)
    ns.run(["ip", "tuntap", "add", "dev", TAP, "mode", "tap", "multi_queue"])
    ns.run(["ip", "link", "add", "br0", "type", "bridge"])
    v = start(tmp_path, ns, "--bridge", "br0", "--mtu", "4000")
    link = ns.run(["ip", "-o", "link", "show", TAP]).stdout
    assert "master br0" in link and "mtu 4000" in link and ",UP" in link, link
    assert v.stop() == 0
    assert exists(TAP), "a tap vhostd attached to must be left in place"


def test_single_queue_persistent_tap_works_with_one_pair(tmp_path: Path, ns: NetNs) -> None:
    ns.run(["ip", "tuntap", "add", "dev", TAP, "mode", "tap"])
    v = start(tmp_path, ns)
    g = Guest(v.listening_socket, RING_FEATURES | bit(VirtioFeature.VERSION_1))
    try:
        cap = capture(ns, 2, "88b5")
        out = eth(b"\xff" * 6, GUEST_MAC, 0x88B5, bytes(46))
        g.net.send(out)
        g.net.tx.wait_used(1)
        assert out in frames_of(cap)
    finally:
        g.close()
        v.stop()


def _udp_frames(n: int) -> list[bytes]:
    """n IPv4/UDP frames of different flows (the tap spreads flows over its queues)."""
    frames = []
    for i in range(n):
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0,
                         bytes([10, 99, 0, 1]), bytes([10, 99, 0, 2]))
        udp = struct.pack(">HHHH", 1000 + i * 7, 2000 + i, 8, 0)
        frames.append(eth(GUEST_MAC, bytes.fromhex("020000000001"), 0x0800, ip + udp).ljust(60, b"\0"))
    return frames


def test_control_queue_mq_detaches_tap_queues_of_inactive_pairs(tmp_path: Path, ns: NetNs) -> None:
    v = start(tmp_path, ns, "--queue-pairs", "2")
    fe = Frontend(str(v.socket))
    fe.negotiate(RING_FEATURES | bit(VirtioFeature.VERSION_1) | bit(17) | bit(22), PROTO)
    ram = GuestRam([8 << 20])
    fe.set_mem_table(ram)
    rings = [DriverRing(ram, i, 256) for i in range(5)]
    for r in rings:
        fe.start_ring(r)
    rx = [NetDriver(rings[0], rings[1]), NetDriver(rings[2], rings[3])]

    def spread() -> tuple[int, int]:
        for d in rx:
            d.post_rx(64)
        for f in _udp_frames(32):
            ns.run([sys.executable, PKTIO, "send", TAP, f.hex()])
        time.sleep(0.5)
        return len(rx[0].rx.take_used()), len(rx[1].rx.take_used())

    try:
        before = spread()
        assert before[1] > 0, f"with 2 pairs some flows use queue 1: {before}"
        out = ram.alloc(4)
        ram.write(out, bytes([4, 0]) + struct.pack("<H", 1))
        ack = ram.alloc(1, 1)
        rings[4].submit([Buf(out, 4), Buf(ack, 1, writable=True)])
        rings[4].kick()
        rings[4].wait_used(1)
        assert ram.read(ack, 1) == b"\x00"
        deadline = time.monotonic() + 5
        while "guest set 1 active queue pair(s)" not in v.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        after = spread()
        assert after[1] == 0 and after[0] >= 32, after
    finally:
        fe.close()
        v.stop()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_rx_limit_holds_frames_in_the_tap(tmp_path: Path, ns: NetNs) -> None:
    """rx_packets_sec = 100 on a real tap, the tap's queue flooded: the
    guest gets 100 frames a second; vhostd drops none and does not spin
    (the frames wait in the tap while its worker sleeps on the limit's
    timer); what the tap cannot queue, the tap drops and counts, as it
    would for a slow guest."""
    ctl = tmp_path / "ctl.sock"
    v = start(tmp_path, ns, "--limit", "rx_packets_sec=100", "--control-socket", str(ctl))
    g = Guest(v.listening_socket, RING_FEATURES | bit(VirtioFeature.VERSION_1))
    try:
        g.net.post_rx(60)
        frame = eth(GUEST_MAC, bytes.fromhex("020000000001"), 0x88B5, b"vhostd-qos" + bytes(40))
        qlen = int(ns.run(["cat", f"/sys/class/net/{TAP}/tx_queue_len"]).stdout)
        tap_dropped = ns.read_stat(TAP, "tx_dropped")
        ns.run([sys.executable, PKTIO, "send", TAP, frame.hex(), str(qlen + 500)])
        start_t, cpu0 = time.monotonic(), _cpu_seconds(v.proc.pid)
        arrivals: list[float] = []
        while time.monotonic() < start_t + 3.5:
            got = g.net.recv(1, timeout=2)
            arrivals += [time.monotonic() - start_t for _hdr, f in got if f == frame]
            g.net.post_rx(len(got))       # the guest keeps 60 buffers posted
        cpu = _cpu_seconds(v.proc.pid) - cpu0
        in_window = sum(1 for t in arrivals if 0.5 <= t < 3.5)
        status = control.request(ctl, "status")["status"]["devices"][0]
        backend_dropped = sum(p["rx_dropped"] for p in status["device"]["queue_pairs"])
        tap_dropped = ns.read_stat(TAP, "tx_dropped") - tap_dropped
        print(f"\nrx 100/s through a flooded tap: {in_window} frames in 3 s, vhostd CPU {cpu:.2f} s, "
              f"vhostd dropped {backend_dropped}, the tap {tap_dropped}")
        assert 285 <= in_window <= 315, " ".join(f"{t:.3f}" for t in arrivals)
        assert backend_dropped == 0
        assert tap_dropped >= 400          # 500 past its queue (less what left it meanwhile)
        assert cpu < 0.5, f"vhostd used {cpu:.2f} s of CPU in 3.5 s while frames waited"
    finally:
        g.close()
        v.stop()
