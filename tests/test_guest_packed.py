"""Packed virtqueues (VIRTIO_F_RING_PACKED) with real Linux guests: QEMU 7.2
under TCG with ``packed=on`` on the devices, Debian's virtio_blk and
virtio_net drivers.  QEMU falls back to split rings silently when a
back-end does not offer the feature, so every test checks both ends: the
guest's negotiated feature bit 34 (/sys/bus/virtio/devices/*/features) and
vhostd's log of each ring's layout."""

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
from test_guest_blk import DISK_SIZE, FIO, PATTERNS, _disk_by_serial, _md5_of, _read_patterns_script, \
    _write_patterns_script
from test_guest_net import GUEST_UP, HOST_IP, _gbits, start_net
from test_guest_restart import KILLS, SCRIPT as FIO_RESTART_SCRIPT, _wait

pytestmark = pytest.mark.guest

# Prints "FEATURES <device id> <bit 34>" per virtio device.
PACKED_BITS = ('for d in /sys/bus/virtio/devices/*; do echo FEATURES $(cat $d/device) '
               '$(cut -c35 $d/features); done')


def packed_devices(output: str, device_id: str) -> list[str]:
    return re.findall(rf"FEATURES {device_id} (\d)", output)


def blk_args(sock: Path, chardev: str, queues: int = 1, reconnect: bool = False) -> list[str]:
    dev = f"socket,id={chardev},path={sock}" + (",reconnect=1" if reconnect else "")
    return ["-chardev", dev,
            "-device", f"vhost-user-blk-pci,chardev={chardev},num-queues={queues},packed=on"]


def packed_rings(log: str) -> set[int]:
    """Rings that ran packed (the firmware's driver, SeaBIOS, uses split rings
    before the kernel's takes over)."""
    return {int(r) for r in re.findall(r"ring (\d+) started \(packed,", log)}


def test_blk_packed_fio_verify_two_queues_and_reboot(tmp_path: Path) -> None:
    guestvm.require_guest()
    image = vhostd_proc.sparse_image(tmp_path / "rw.img", DISK_SIZE)
    with vhostd_proc.blk(tmp_path, image, "--num-queues", "2", "--serial", "vhd-pk", name="pk") as v:
        qemu = blk_args(v.listening_socket, "pk", queues=2)
        script = f"""
set -e
{PACKED_BITS}
{_disk_by_serial("vhd-pk")}
echo QUEUES $(ls /sys/block/vda/mq | wc -l)
{_write_patterns_script()}
{FIO} > /tmp/fio.out
echo FIO-ERR $(grep -v '^fio:' /tmp/fio.out | cut -d';' -f5)
"""
        first = guestvm.run_guest(script, qemu, smp=2, timeout=300)
        out = first.output
        assert first.rc == 0, first.describe()
        assert packed_devices(out, "0x0002") == ["1"], first.describe()
        assert "QUEUES 2" in out and "FIO-ERR 0" in out, first.describe()
        for name, off, length in PATTERNS:
            m = re.search(rf"PATTERN {name} ([0-9a-f]{{32}})", out)
            assert m and _md5_of(image, off, length) == m.group(1), f"pattern {name}:\n{first.describe()}"
        assert packed_rings(v.log()) == {0, 1}, v.log()
        # Both queues carried requests: each stopped ring's avail position moved
        # (the packed base: avail index and wrap counter in the low 16 bits).
        stops = {int(q): int(n) for q, n in re.findall(r"pk: ring (\d) stopped at (\d+)", v.log())}
        assert all(stops.get(q, 0x80008000) & 0xFFFF != 0x8000 for q in (0, 1)), stops

        second = guestvm.run_guest(f"{PACKED_BITS}\n{_read_patterns_script()}", qemu, timeout=120)
        assert second.rc == 0, second.describe()
        assert packed_devices(second.output, "0x0002") == ["1"], second.describe()
        for name, off, length in PATTERNS:
            assert f"READ {name} {_md5_of(image, off, length)}" in second.output, second.describe()
        assert v.alive() and v.log().count("front-end connected") == 2


def test_blk_packed_kill_9_three_times_under_fio_verify(tmp_path: Path) -> None:
    """vhostd killed with SIGKILL while the guest's fio (crc32c verify) has
    requests in flight on a packed ring: the new vhostd takes the ring's
    state from the packed inflight region (QEMU cannot know it and sends what
    it last knew) and resubmits what was in flight exactly once."""
    guestvm.require_guest()
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", 64 << 20)
    sock = tmp_path / "blk.sock"
    log = tmp_path / "blk.log"
    args = ["blk", "--socket-path", str(sock), "--file", str(image)]

    def start() -> vhostd_proc.Vhostd:
        return vhostd_proc.Vhostd(args, sock, log)

    v = start()
    with guestvm.start_guest(f"{PACKED_BITS}\n{FIO_RESTART_SCRIPT}", blk_args(sock, "c0", reconnect=True),
                             timeout=240) as g:
        assert g.wait_for("FIO-RUNNING", 90), g.console
        for _ in range(KILLS):
            time.sleep(3)
            started = v.log().count("ring 0 started")
            v.stop(signal.SIGKILL)
            v = start()
            assert _wait(lambda: v.log().count("ring 0 started") > started, 30) is not None, v.log()
        res = g.result()
    v.stop()
    assert res.rc == 0, res.describe()
    assert packed_devices(res.output, "0x0002") == ["1"], res.describe()
    assert "FIO-RC 0" in res.output and "FIO-ERR 0" in res.output, res.describe()
    text = log.read_text(errors="replace")
    assert "inflight buffer restored" in text and packed_rings(text) == {0}, text
    assert text.count("ring 0 started (packed") >= KILLS + 1, text
    resubmitted = sum(int(n) for n in re.findall(r"resubmitting (\d+)", text))
    print(f"\npacked ring: requests resubmitted over {KILLS} restarts: {resubmitted}")


@pytest.mark.root
def test_net_packed_ping_iperf3_both_ways_two_queue_pairs(tmp_path: Path, ns: NetNs) -> None:
    guestvm.require_guest()
    v = start_net(tmp_path, ns, "--queue-pairs", "2")
    server = ns.popen(["iperf3", "-s", "-B", HOST_IP], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        script = f"""
set -e
{PACKED_BITS}
{GUEST_UP}
echo QUEUES $(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)
ping -c 3 -W 5 {HOST_IP} | grep -q ' 0% packet loss' && echo PING-OK
taskset 1 ping -c 5 -i 0.2 {HOST_IP} >/dev/null & taskset 2 ping -c 5 -i 0.2 {HOST_IP} >/dev/null; wait
echo TX-TEST; iperf3 -c {HOST_IP} -t 3 -f g
echo RX-TEST; iperf3 -c {HOST_IP} -t 3 -R -P 2 -f g
"""
        qemu = ["-chardev", f"socket,id=n0,path={v.listening_socket}",
                "-netdev", "vhost-user,id=net0,chardev=n0,queues=2",
                "-device", "virtio-net-pci,netdev=net0,vectors=0,mq=on,packed=on"]
        res = guestvm.run_guest(script, qemu, smp=2, timeout=180)
        assert res.rc == 0, res.describe()
        out = res.output
        assert packed_devices(out, "0x0001") == ["1"], res.describe()
        assert "QUEUES 2" in out and "PING-OK" in out, res.describe()
        tx, rx = _gbits(out.split("RX-TEST")[0], "TX-TEST"), _gbits(out.split("RX-TEST")[1], "")
        print(f"\nguest iperf3 over packed rings: guest->host {tx} Gbit/s, host->guest {rx} Gbit/s")
        assert tx > 0 and rx > 0, res.describe()
        assert v.alive()
    finally:
        server.terminate()
        server.wait()
        v.stop()
    assert packed_rings(v.log()) == {0, 1, 2, 3}, v.log()
    stops = {int(q): int(n) for q, n in re.findall(r"ring (\d) stopped at (\d+)", v.log())}
    moved = {q for q, n in stops.items() if n & 0xFFFF != 0x8000}
    assert {1, 3} <= moved and moved & {0, 2}, stops
