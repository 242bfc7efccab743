"""vhostd net against DPDK's virtio_user front-end (dpdk-testpmd, no VM).

Topology of every test: a network namespace of the test's own holds the
tap; ``vhostd net`` runs inside it (so it creates the tap there) and
listens on a socket file; dpdk-testpmd runs in the root namespace with
``--vdev net_virtio_user0,path=SOCK`` (it needs no network at all) and
connects to it as a client.  All frames stay between testpmd's rings,
vhostd and the tap in that namespace.

testpmd runs non-interactively (``--auto-start --stats-period 1``): it
prints its port counters every second and stops, prints the forward
statistics and exits on SIGINT.  It busy-polls, so its forwarding lcore is
pinned to CPU 1 (main lcore, which sleeps, too) and every run is bounded
in time; the rest (vhostd, senders) share CPU 0.

Rates printed (``-s``) are informational; these machines are shared and
drift, see /work/shared/PEERS.md.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import NetNs, netns, netns_available, vhostd_net  # noqa: E402
from unavailable import missing  # noqa: E402
from vhostd_proc import Vhostd  # noqa: E402

from vhostd.frontend import Buf, DriverRing, Frontend, GuestRam  # noqa: E402
from vhostd.protocol.constants import VirtioFeature, bit  # noqa: E402

pytestmark = [pytest.mark.root]

QUEUE_SIZE = 1024
NET_F_CSUM, NET_F_GUEST_CSUM = 0, 1
# testpmd: RX UDP/TCP checksum + LRO, TX UDP/TCP checksum + TSO (what
# virtio's PMD can offer; IPv4 checksum it cannot and configure would fail).
OFFLOADS_ON = ("--rx-offloads=0x1c", "--tx-offloads=0x2c")

# Frames sent on the tap (i.e. read by vhostd, then handed to the guest
# RX ring): broadcast, local experimental ethertype, FRAME_LEN bytes.
SENDER = r"""
import json, socket, sys, time
ifname, count, burst, gap, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
frame = (b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5").ljust(size, b"\xa5")
send, sleep = s.send, time.sleep
sent = errors = 0
t0 = time.monotonic()
while sent < count:
    for _ in range(min(burst, count - sent)):
        try:
            send(frame)
        except OSError:
            errors += 1
        sent += 1
    if gap:
        sleep(gap)
print(json.dumps({"sent": sent, "errors": errors, "seconds": time.monotonic() - t0}))
"""


@pytest.fixture(scope="module")
def testpmd_bin() -> str:
    why = netns_available()
    if why:
        missing(f"network tests: {why}")
    path = shutil.which("dpdk-testpmd")
    if path is None:
        missing("dpdk-testpmd not installed (apt-get install dpdk-dev)")
    return path


# --- testpmd -----------------------------------------------------------------

_run_ids = itertools.count()
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """A busy-polling testpmd must not outlive a killed pytest."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class FwdStats:
    rx: int
    tx: int
    tx_dropped: int


class Testpmd:
    """One non-interactive dpdk-testpmd run against a vhost-user socket."""

    __test__ = False

    def __init__(self, binary: str, tmp: Path, sock: Path, mode: str, *args: str,
                 vdev: str = "") -> None:
        n = next(_run_ids)
        self.prefix = f"vhd-{os.getpid()}-{n}"
        self.out_path = tmp / f"testpmd-{n}-{mode}.out"
        cmd = [binary, "--no-pci", f"--file-prefix={self.prefix}",
               "--lcores=(0,1)@1", "--no-huge", "-m", "256",
               "--vdev", f"net_virtio_user0,path={sock},queue_size={QUEUE_SIZE}{vdev}",
               "--", f"--forward-mode={mode}", "--auto-start", "--stats-period", "1",
               "--total-num-mbufs=16384", *args]
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.returncode: int | None = None

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_forwarding(self, timeout: float = 20.0) -> None:
        """Until the port is started and forwarding runs."""
        deadline = time.monotonic() + timeout
        while "packet forwarding - ports=" not in self.output():
            if self.proc.poll() is not None:
                raise AssertionError(f"testpmd exited {self.proc.returncode}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"testpmd did not start forwarding:\n{self.output()[-4000:]}")
            time.sleep(0.05)

    def port_stats(self) -> tuple[int, int, int, int]:
        """The last periodic port counters: rx packets, rx bytes, tx packets, tx bytes."""
        rx = re.findall(r"RX-packets:\s+(\d+)\s+RX-missed:\s+\d+\s+RX-bytes:\s+(\d+)", self.output())
        tx = re.findall(r"TX-packets:\s+(\d+)\s+TX-errors:\s+\d+\s+TX-bytes:\s+(\d+)", self.output())
        assert rx and tx, self.output()[-4000:]
        return int(rx[-1][0]), int(rx[-1][1]), int(tx[-1][0]), int(tx[-1][1])

    def wait_stats_after(self, t: float) -> tuple[int, int, int, int]:
        """Port counters printed after monotonic time t (they come every second)."""
        time.sleep(max(0.0, t - time.monotonic()))
        seen = self.output().count("Port statistics")
        deadline = time.monotonic() + 5
        while self.output().count("Port statistics") == seen:
            assert time.monotonic() < deadline, "testpmd stopped printing statistics"
            time.sleep(0.05)
        time.sleep(0.1)   # the block is complete
        return self.port_stats()

    def stop(self, timeout: float = 15.0) -> FwdStats:
        """SIGINT: testpmd stops forwarding, prints totals and exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"testpmd did not exit on SIGINT:\n{self.output()[-4000:]}")
        self._out.close()
        out = self.output()
        m = re.search(r"Accumulated forward statistics.*?\n\s*RX-packets:\s+(\d+).*?\n"
                      r"\s*TX-packets:\s+(\d+)\s+TX-dropped:\s+(\d+)", out, re.S)
        assert m, f"no forward statistics in testpmd output (rc {self.returncode}):\n{out[-4000:]}"
        assert self.returncode in (0, -signal.SIGINT), f"testpmd rc {self.returncode}:\n{out[-4000:]}"
        return FwdStats(int(m[1]), int(m[2]), int(m[3]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not self._out.closed:
            self._out.close()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)


@pytest.fixture
def ns(testpmd_bin: str) -> Iterator[NetNs]:
    with netns("dpdk") as n:
        yield n


@pytest.fixture
def testpmd(testpmd_bin: str, tmp_path: Path) -> Iterator[Callable[..., Testpmd]]:
    runs: list[Testpmd] = []

    def start(sock: Path, mode: str, *args: str, vdev: str = "") -> Testpmd:
        t = Testpmd(testpmd_bin, tmp_path, sock, mode, *args, vdev=vdev)
        runs.append(t)
        return t

    yield start
    for t in runs:
        t.cleanup()


@pytest.fixture
def vhostd(ns: NetNs, tmp_path: Path) -> Iterator[Callable[..., Vhostd]]:
    """Starts ``vhostd net`` in the test's namespace.  At teardown each must
    still be running and exit 0 on SIGTERM (and remove its tap)."""
    daemons: list[tuple[Vhostd, str]] = []

    def make(tap: str, *extra: str) -> Vhostd:
        d = vhostd_net(ns, tmp_path, tap, *extra, name=f"net{len(daemons)}")
        daemons.append((d, tap))
        return d

    yield make
    problems = []
    for d, tap in daemons:
        alive = d.alive()
        try:
            rc = d.stop()
        except subprocess.TimeoutExpired:
            rc = None
        if not alive:
            problems.append(f"vhostd died during the test (rc {rc}):\n{d.log()[-4000:]}")
        elif rc != 0:
            problems.append(f"vhostd exited {rc} on SIGTERM:\n{d.log()[-4000:]}")
        elif ns.run(["test", "-e", f"/sys/class/net/{tap}"], check=False).returncode == 0:
            problems.append(f"tap {tap} still exists after vhostd exited")
    assert not problems, "\n".join(problems)


# --- helpers -----------------------------------------------------------------

@dataclass
class TxResult:
    frames: int          # frames the tap received during the measured window
    seconds: float
    tap_total: int       # tap rx_packets over the whole testpmd run
    tap_bytes: int
    fwd: FwdStats

    @property
    def mpps(self) -> float:
        return self.frames / self.seconds / 1e6


def txonly(ns: NetNs, testpmd: Callable[..., Testpmd], d: Vhostd, tap: str, *args: str,
           seconds: float = 3.0, size: int = 64, vdev: str = "") -> TxResult:
    """testpmd txonly through vhostd into the tap; counts what the tap received."""
    assert d.socket is not None
    before = ns.read_stats(tap, "rx_packets", "rx_bytes")
    t = testpmd(d.socket, "txonly", f"--txpkts={size}", *args, vdev=vdev)
    try:
        t.wait_forwarding()
        time.sleep(0.3)
        r0, t0 = ns.read_stat(tap, "rx_packets"), time.monotonic()
        time.sleep(seconds)
        r1, t1 = ns.read_stat(tap, "rx_packets"), time.monotonic()
        fwd = t.stop()
    finally:
        t.kill()
    after = ns.read_stats(tap, "rx_packets", "rx_bytes")
    return TxResult(r1 - r0, t1 - t0, after["rx_packets"] - before["rx_packets"],
                    after["rx_bytes"] - before["rx_bytes"], fwd)


def check_tx(res: TxResult, size: int, label: str, min_frames: int = 10_000, queues: int = 1) -> None:
    print(f"\n{label}: {res.frames} frames of {size} B in {res.seconds:.2f} s = {res.mpps:.3f} Mpps "
          f"(testpmd: {res.fwd.tx} sent, {res.fwd.tx_dropped} refused by a full ring)")
    assert res.frames > min_frames, f"{label}: only {res.frames} frames reached the tap"
    # Every frame the tap got is testpmd's, intact (no header bytes left, none cut).
    assert res.tap_bytes == size * res.tap_total, (res.tap_bytes, res.tap_total)
    # Everything testpmd completed reached the tap, but for what was still on
    # the rings when it stopped the device.
    assert res.fwd.tx - queues * QUEUE_SIZE <= res.tap_total <= res.fwd.tx, (res.tap_total, res.fwd)


def send_frames(ns: NetNs, tap: str, count: int, burst: int = 0, gap: float = 0.0,
                size: int = 64) -> dict[str, Any]:
    out = ns.run([sys.executable, "-c", SENDER, tap, str(count), str(burst or count), str(gap),
                  str(size)], timeout=60).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def log_features(log: str) -> list[int]:
    return [int(v) for v in re.findall(r"VHOST_USER_SET_FEATURES U64\(value=(\d+)\)", log)]


def wait_log(d: Vhostd, needle: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while d.log().count(needle) < count:
        assert time.monotonic() < deadline, f"no {count}x {needle!r} in vhostd's log:\n{d.log()[-4000:]}"
        time.sleep(0.05)


# The rings virtio_user lays out: split (its default), or packed
# (packed_vq=1), asking for IN_ORDER or not (vhostd does not offer
# VIRTIO_F_IN_ORDER, so in_order=1 runs the PMD's out-of-order paths too).
LAYOUTS = {"split": "", "packed": ",packed_vq=1,in_order=0", "packed-in_order": ",packed_vq=1,in_order=1"}
RING_PACKED = 34


def check_layout(d: Vhostd, layout: str) -> None:
    """The rings ran the layout asked for (virtio_user acks RING_PACKED only with packed_vq=1)."""
    features = log_features(d.log())
    packed = layout != "split"
    assert features and all(bool(f & bit(RING_PACKED)) == packed for f in features), (layout, features)
    assert ("started (packed" in d.log()) == packed and ("started (split" in d.log()) != packed, d.log()[-4000:]


# --- tests -------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_txonly_64_and_1518(ns: NetNs, vhostd: Callable[..., Vhostd],
                            testpmd: Callable[..., Testpmd], layout: str) -> None:
    """Guest -> tap at line rate: every frame testpmd sends arrives whole."""
    d = vhostd("vtapt")
    for size in (64, 1518):
        res = txonly(ns, testpmd, d, "vtapt", size=size, vdev=LAYOUTS[layout])
        check_tx(res, size, f"txonly {size} B, {layout} rings")
        assert d.alive(), d.log()[-4000:]
    assert ns.read_stat("vtapt", "rx_errors") == 0
    check_layout(d, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rxonly(ns: NetNs, vhostd: Callable[..., Vhostd], testpmd: Callable[..., Testpmd], layout: str) -> None:
    """Tap -> guest: frames sent on the tap in the namespace reach testpmd."""
    tap = "vtapr"
    d = vhostd(tap)
    # A deeper tap queue (its ring follows txqueuelen) absorbs scheduling
    # hiccups of vhostd on a loaded machine during the paced phase.
    ns.run(["ip", "link", "set", tap, "txqueuelen", "10000"])
    assert d.socket is not None
    t = testpmd(d.socket, "rxonly", vdev=LAYOUTS[layout])
    try:
        t.wait_forwarding()
        base = ns.read_stats(tap, "tx_packets", "tx_dropped")
        # Paced: ~50k frames/s, well below what vhostd moves; all must arrive.
        paced = send_frames(ns, tap, 30_000, burst=100, gap=0.002)
        rx, rx_bytes, _, _ = t.wait_stats_after(time.monotonic() + 0.5)
        mid = ns.read_stats(tap, "tx_packets", "tx_dropped")
        print(f"\nrxonly paced: {paced['sent']} sent in {paced['seconds']:.2f} s, testpmd received {rx}")
        assert paced["errors"] == 0, paced
        assert rx >= 0.95 * paced["sent"], (rx, paced)
        assert rx <= paced["sent"], "testpmd received frames nobody sent"
        assert rx_bytes == 64 * rx, (rx_bytes, rx)
        # Flood: as fast as one Python sender goes; the tap drops what vhostd
        # cannot take, but whatever the tap queued must reach testpmd.
        flood = send_frames(ns, tap, 300_000)
        t1 = time.monotonic()
        rx2, rx2_bytes, _, _ = t.wait_stats_after(t1 + 1.0)
        tap_stats = ns.read_stats(tap, "tx_packets", "tx_dropped")
        fwd = t.stop()
    finally:
        t.kill()
    queued = tap_stats["tx_packets"] - mid["tx_packets"]
    dropped = tap_stats["tx_dropped"] - mid["tx_dropped"]
    got = rx2 - rx
    print(f"rxonly flood: {flood['sent']} sent in {flood['seconds']:.2f} s "
          f"({flood['sent'] / flood['seconds'] / 1e6:.3f} Mpps offered), tap queued {queued}, "
          f"dropped {dropped}; testpmd received {got} = {got / flood['seconds'] / 1e6:.3f} Mpps")
    assert fwd.rx == rx2, (fwd, rx2)
    assert rx2_bytes == 64 * rx2
    # What the tap queued for vhostd, vhostd delivered (a few may still be
    # in flight when the last statistics were printed: none here, it idled 1 s).
    assert fwd.rx >= tap_stats["tx_packets"] - base["tx_packets"] - 16, (fwd, tap_stats, base)
    assert got >= queued - 16, (got, queued)
    assert got > 10_000, got
    assert d.alive(), d.log()[-4000:]
    check_layout(d, layout)


def test_offloads_on_and_off(ns: NetNs, vhostd: Callable[..., Vhostd],
                             testpmd: Callable[..., Testpmd]) -> None:
    """Both feature sets a virtio_user front-end negotiates carry traffic."""
    tap = "vtapo"
    d = vhostd(tap)
    seen = 0
    negotiated = {}
    for label, args in (("offloads off", ()), ("offloads on", OFFLOADS_ON)):
        res = txonly(ns, testpmd, d, tap, *args, seconds=1.5)
        check_tx(res, 64, f"txonly 64 B, {label}")
        features = log_features(d.log())
        assert len(features) > seen, "no SET_FEATURES in vhostd's log"
        negotiated[label] = features[-1]   # the last of this connection
        seen = len(features)
        print(f"{label}: features {negotiated[label]:#x}")
    off, on = negotiated["offloads off"], negotiated["offloads on"]
    assert off != on
    assert not off & (bit(NET_F_CSUM) | bit(NET_F_GUEST_CSUM)), hex(off)
    assert on & bit(NET_F_CSUM) and on & bit(NET_F_GUEST_CSUM), hex(on)
    assert on & bit(VirtioFeature.VERSION_1) and off & bit(VirtioFeature.VERSION_1)
    # Without offloads the tap went without the virtio-net header, and got it back.
    log = d.log()
    without = log.find("reattached without the virtio-net header")
    assert 0 <= without < log.find("reattached with the virtio-net header"), log[-4000:]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_queue_pairs(ns: NetNs, vhostd: Callable[..., Vhostd],
                         testpmd: Callable[..., Testpmd], layout: str) -> None:
    tap = "vtapm"
    d = vhostd(tap, "--queue-pairs", "2")
    res = txonly(ns, testpmd, d, tap, "--rxq=2", "--txq=2", "--nb-cores=1",
                 seconds=1.5, vdev=",queues=2" + LAYOUTS[layout])
    check_tx(res, 64, f"txonly 64 B, 2 queue pairs, {layout} rings", queues=2)
    check_layout(d, layout)
    log = d.log()
    for ring in range(4):
        assert f"ring {ring} started" in log, log[-4000:]
    # Both transmit queues carried frames (the index is mod 2^16; 0 by
    # chance is 1 in 65536).
    stopped = {int(r): int(n) for r, n in re.findall(r"ring (\d+) stopped at (\d+)", log)}
    print(f"rings stopped at {stopped}")
    if layout == "split":
        assert stopped.get(1) and stopped.get(3), stopped
    else:   # a packed base: avail position and wrap counter in the low half, new ring 0x8000
        assert all(stopped.get(r, 0x8000) & 0xFFFF != 0x8000 for r in (1, 3)), stopped


def test_garbage_frontend_then_testpmd(ns: NetNs, vhostd: Callable[..., Vhostd],
                                       testpmd: Callable[..., Testpmd]) -> None:
    """A front-end whose chains point outside its memory gets its rings
    flagged on their err eventfds; vhostd goes on serving the next one."""
    tap = "vtapg"
    d = vhostd(tap)
    check_tx(txonly(ns, testpmd, d, tap, seconds=1.0), 64, "txonly before garbage")
    wait_log(d, "front-end disconnected", 1)
    assert d.socket is not None

    ram = GuestRam([1 << 20])
    rx_ring, tx_ring = DriverRing(ram, 0, 256), DriverRing(ram, 1, 256)
    fe = Frontend(str(d.socket))
    try:
        features, _ = fe.negotiate(bit(VirtioFeature.VERSION_1)
                                   | bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES), 0)
        assert features & bit(VirtioFeature.VERSION_1)
        fe.set_mem_table(ram)
        outside = ram.end + (1 << 30)
        # TX: a frame "at" an address no region covers.
        fe.start_ring(tx_ring)
        tx_ring.submit([Buf(outside, 12 + 64)])
        tx_ring.kick()
        # RX: a writable buffer outside memory, and a frame for it from the tap.
        fe.start_ring(rx_ring)
        rx_ring.submit([Buf(outside, 2048, writable=True)])
        rx_ring.kick()
        send_frames(ns, tap, 1)
        deadline = time.monotonic() + 5
        tx_err = rx_err = 0
        while (not tx_err or not rx_err) and time.monotonic() < deadline:
            tx_err += tx_ring.errors()
            rx_err += rx_ring.errors()
            time.sleep(0.05)
        print(f"\nerr eventfds: tx ring {tx_err}, rx ring {rx_err}")
        assert tx_err > 0, f"TX ring did not report the bad descriptor:\n{d.log()[-3000:]}"
        assert rx_err > 0, f"RX ring did not report the bad descriptor:\n{d.log()[-3000:]}"
        assert tx_ring.used_idx() == 0 and rx_ring.used_idx() == 0
        assert d.alive()
    finally:
        fe.close()
        tx_ring.close()
        rx_ring.close()
        ram.close()
    wait_log(d, "front-end disconnected", 2)
    check_tx(txonly(ns, testpmd, d, tap, seconds=1.0), 64, "txonly after garbage")
