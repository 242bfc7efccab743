"""Ring worker options and reporting, over a real socket: the null net
back-end, busy-poll, CPU pinning, idle cost, and the log line for a ring a
guest broke."""

from __future__ import annotations

import os
import time
from pathlib import Path

import vhostd_proc
from vhostd.frontend import BlkDriver, Buf, DriverRing, Frontend, GuestRam, NetDriver
from vhostd.protocol.constants import ProtocolFeature, VirtioFeature, bit

PROTO = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
FEATURES = (bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
            | bit(VirtioFeature.RING_EVENT_IDX))


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _blk_session(sock: Path, queues: int = 1) -> tuple[Frontend, list[BlkDriver]]:
    fe = Frontend(str(sock))
    fe.negotiate(FEATURES, PROTO)
    ram = GuestRam([8 << 20])
    fe.set_mem_table(ram)
    drivers = []
    for q in range(queues):
        ring = DriverRing(ram, q, 64, event_idx=True)
        fe.start_ring(ring)
        drivers.append(BlkDriver(ring))
    return fe, drivers


def test_null_net_backend_discards_tx_and_generates_rx(tmp_path: Path) -> None:
    sock = tmp_path / "null.sock"
    with vhostd_proc.Vhostd(["net", "--backend", "null", "--socket-path", str(sock),
                             "--mac", "52:54:00:00:00:07"], sock, tmp_path / "null.log") as v:
        fe = Frontend(str(sock))
        fe.negotiate(FEATURES, PROTO)
        ram = GuestRam([4 << 20])
        fe.set_mem_table(ram)
        rx, tx = DriverRing(ram, 0, 64), DriverRing(ram, 1, 64)
        fe.start_ring(rx)
        fe.start_ring(tx)
        net = NetDriver(rx, tx)
        for _ in range(10):
            net.send(bytes(60))
        assert len(tx.wait_used(10)) == 10
        net.post_rx(8)
        frames = net.recv(8)
        assert len(frames) == 8
        for hdr, frame in frames:
            assert frame[:14] == b"\xff" * 6 + bytes.fromhex("525400000007") + b"\x88\xb5"
            assert len(frame) == 60 and hdr[10:12] == b"\x01\x00"
        fe.close()
        assert v.alive()


def test_poll_mode_serves_requests_and_an_idle_device_costs_no_cpu(tmp_path: Path) -> None:
    image = vhostd_proc.sparse_image(tmp_path / "d.img", 4 << 20)
    with vhostd_proc.blk(tmp_path, image, "--poll-us", "200", "--num-queues", "2") as v:
        fe, drivers = _blk_session(v.listening_socket, queues=2)
        for i, d in enumerate(drivers):
            for k in range(50):
                assert d.write(8 * k + i, bytes([k]) * 512).status == 0
                assert d.read(8 * k + i, 512).data == bytes([k]) * 512
        time.sleep(0.5)          # let any poll window run out
        before = _cpu_seconds(v.proc.pid)
        time.sleep(2)
        idle = _cpu_seconds(v.proc.pid) - before
        assert idle < 0.1, f"idle device used {idle:.2f} CPU seconds in 2 s"
        fe.close()


def test_cpu_affinity_pins_ring_workers(tmp_path: Path) -> None:
    image = vhostd_proc.sparse_image(tmp_path / "d.img", 4 << 20)
    last = (os.cpu_count() or 1) - 1
    with vhostd_proc.blk(tmp_path, image, "--cpu-affinity", str(last)) as v:
        fe, (d,) = _blk_session(v.listening_socket)
        assert d.read(0, 512).status == 0

        def allowed() -> list[str]:
            out = []
            for tid in os.listdir(f"/proc/{v.proc.pid}/task"):
                for line in open(f"/proc/{v.proc.pid}/task/{tid}/status"):
                    if line.startswith("Cpus_allowed_list:"):
                        out.append(line.split()[1])
            return out

        assert str(last) in allowed(), allowed()
        fe.close()


def test_a_ring_broken_by_the_guest_is_logged_with_its_reason(tmp_path: Path) -> None:
    image = vhostd_proc.sparse_image(tmp_path / "d.img", 4 << 20)
    with vhostd_proc.blk(tmp_path, image, "--num-queues", "2") as v:
        fe, (d0, d1) = _blk_session(v.listening_socket, queues=2)
        d0.ring.submit([Buf(1 << 40, 16), Buf(0x100000, 1, writable=True)])
        d0.ring.kick()
        deadline = time.monotonic() + 5
        while "guest error" not in v.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "blk0: ring 0: guest error, ring stopped (device needs reset): buffer outside guest memory" in v.log()
        assert d0.ring.errors() == 1
        # The other queue of the same device is unaffected.
        assert d1.write(3, b"\x11" * 512).status == 0
        fe.close()
