"""virtio-net through vhostd and a tap, driven by a real Linux guest's
virtio_net driver (QEMU 7.2 under TCG).  The tap lives in a network
namespace the test creates; vhostd runs inside it.

QEMU 7.2 under TCG aborts with vhost-user-net and MSI-X as soon as the
driver starts: the device gets vectors=0 (legacy INTx), see README."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import guestvm
import vhostd_proc
from netns import NetNs

pytestmark = [pytest.mark.guest, pytest.mark.root]

HOST_IP, GUEST_IP = "10.99.0.1", "10.99.0.2"


def start_net(tmp: Path, ns: NetNs, *args: str, tap: str = "vtap0") -> vhostd_proc.Vhostd:
    sock = tmp / "net.sock"
    v = vhostd_proc.Vhostd(["net", "--socket-path", str(sock), "--tap", tap, *args], sock,
                           tmp / "net.log", prefix=ns.cmd([]))
    ns.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap])
    return v


def net_args(sock: Path, queues: int = 1, extra: str = "") -> list[str]:
    mq = f",mq=on" if queues > 1 else ""
    return ["-chardev", f"socket,id=n0,path={sock}",
            "-netdev", f"vhost-user,id=net0,chardev=n0,queues={queues}",
            "-device", f"virtio-net-pci,netdev=net0,vectors=0{mq}{extra}"]


GUEST_UP = f"ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up"


def _gbits(output: str, tag: str) -> float:
    m = re.search(rf"{tag}.*?([\d.]+) Gbits/sec\s+receiver", output, re.S)
    return float(m.group(1)) if m else 0.0


def test_guest_ping_iperf3_tso_and_two_queue_pairs(tmp_path: Path, ns: NetNs) -> None:
    guestvm.require_guest()
    v = start_net(tmp_path, ns, "--queue-pairs", "2")
    server = ns.popen(["iperf3", "-s", "-B", HOST_IP], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    try:
        script = f"""
set -e
{GUEST_UP}
echo QUEUES $(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)
ping -c 3 -W 5 {HOST_IP} | grep -q ' 0% packet loss' && echo PING-OK
# One pinger per CPU: XPS maps CPU i to TX queue i.
taskset 1 ping -c 5 -i 0.2 {HOST_IP} >/dev/null & taskset 2 ping -c 5 -i 0.2 {HOST_IP} >/dev/null; wait
echo TX-TEST; iperf3 -c {HOST_IP} -t 3 -f g
echo RX-TEST; iperf3 -c {HOST_IP} -t 3 -R -P 2 -f g
"""
        rx0, rxb0 = ns.read_stat("vtap0", "rx_packets"), ns.read_stat("vtap0", "rx_bytes")
        res = guestvm.run_guest(script, net_args(v.listening_socket, queues=2), smp=2, timeout=180)
        assert res.rc == 0, res.describe()
        out = res.output
        assert "QUEUES 2" in out and "PING-OK" in out, res.describe()
        tx, rx = _gbits(out.split("RX-TEST")[0], "TX-TEST"), _gbits(out.split("RX-TEST")[1], "")
        print(f"\nguest iperf3 through vhostd: guest->host {tx} Gbit/s, host->guest {rx} Gbit/s")
        assert tx > 0 and rx > 0, res.describe()
        # TSO: the tap received frames far larger than the 1500-byte MTU.
        frames = ns.read_stat("vtap0", "rx_packets") - rx0
        avg = (ns.read_stat("vtap0", "rx_bytes") - rxb0) / frames
        assert avg > 3000, f"average frame from the guest {avg:.0f} B: TSO not used"
        assert v.alive()
    finally:
        server.terminate()
        server.wait()
        v.stop()
    stops = {int(q): int(n) for q, n in re.findall(r"ring (\d) stopped at (\d+)", v.log())}
    # Both TX queues (rings 1, 3) carried frames, and the receive side used its rings.
    assert stops.get(1, 0) > 0 and stops.get(3, 0) > 0, stops
    assert stops.get(0, 0) + stops.get(2, 0) > 0, stops


def test_guest_mtu_9000_jumbo_frames(tmp_path: Path, ns: NetNs) -> None:
    guestvm.require_guest()
    v = start_net(tmp_path, ns, "--mtu", "9000")
    try:
        script = f"""
set -e
{GUEST_UP}
echo MTU $(cat /sys/class/net/eth0/mtu)
ping -c 3 -W 5 -s 8000 {HOST_IP} | grep -q ' 0% packet loss' && echo JUMBO-PING-OK
"""
        rx0, rxb0 = ns.read_stat("vtap0", "rx_packets"), ns.read_stat("vtap0", "rx_bytes")
        res = guestvm.run_guest(script, net_args(v.listening_socket, extra=",host_mtu=9000"), timeout=120)
        assert res.rc == 0, res.describe()
        assert "MTU 9000" in res.output and "JUMBO-PING-OK" in res.output, res.describe()
        # Unfragmented: the 8 KB echo requests reached the tap as single frames.
        big = ns.read_stat("vtap0", "rx_bytes") - rxb0
        frames = ns.read_stat("vtap0", "rx_packets") - rx0
        assert big >= 3 * 8000 and frames < 3 * 6, (big, frames)
        assert "VHOST_USER_NET_SET_MTU U64(value=9000)" in v.log()
    finally:
        v.stop()


def test_guest_traffic_resumes_after_vhostd_kill_9(tmp_path: Path, ns: NetNs) -> None:
    """A persistent tap (as libvirt makes) keeps its address across the
    restart; QEMU reconnects (reconnect=1) and the guest's ping resumes."""
    guestvm.require_guest()
    ns.run(["ip", "tuntap", "add", "dev", "vtap0", "mode", "tap", "multi_queue"])
    ns.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", "vtap0"])
    sock = tmp_path / "net.sock"
    args = ["net", "--socket-path", str(sock), "--tap", "vtap0"]
    prefix = ns.cmd([])

    def start() -> vhostd_proc.Vhostd:
        return vhostd_proc.Vhostd(args, sock, tmp_path / "net.log", prefix=prefix)

    v = start()
    qemu = ["-chardev", f"socket,id=n0,path={sock},reconnect=1",
            "-netdev", "vhost-user,id=net0,chardev=n0",
            "-device", "virtio-net-pci,netdev=net0,vectors=0"]
    script = f"{GUEST_UP}\necho PING-START\nping -c 48 -i 0.25 -W 1 {HOST_IP}\necho DONE"
    with guestvm.start_guest(script, qemu, timeout=180) as g:
        assert g.wait_for("PING-START", 90), g.console
        time.sleep(3)
        v.stop(signal.SIGKILL)
        time.sleep(1)
        v = start()
        res = g.result()
    v.stop()
    assert res.rc == 0, res.describe()
    seqs = [int(s) for s in re.findall(r"seq=(\d+)", res.output)]
    # Replies before the kill, and again at the end after the restart.
    assert any(s < 8 for s in seqs) and any(s >= 44 for s in seqs), res.describe()
    lost = 48 - len(seqs)
    print(f"\nping across a vhostd restart: {lost} of 48 lost (0.25 s apart)")
    assert v.log().count("front-end connected") >= 2
