"""The virtio-net control virtqueue, for a front-end that hands it over
(QEMU and DPDK keep it): MQ, RX mode, MAC and ANNOUNCE commands are
acknowledged correctly; malformed ones get VIRTIO_NET_ERR; the active
queue pairs reach the tap.  Driven by the Python front-end."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import vhostd_proc
from vhostd.frontend import Buf, DriverRing, Frontend, GuestRam
from vhostd.protocol.constants import ProtocolFeature, VirtioFeature, bit

CTRL_VQ, CTRL_RX, MQ, CTRL_MAC_ADDR = 17, 18, 22, 23
PROTO = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
OK, ERR = 0, 1


class Ctrl:
    def __init__(self, sock: Path, pairs: int, mq: bool = True) -> None:
        self.fe = Frontend(str(sock))
        want = (bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
                | bit(CTRL_VQ) | bit(CTRL_RX) | bit(CTRL_MAC_ADDR) | (bit(MQ) if mq else 0))
        self.features, _ = self.fe.negotiate(want, PROTO)
        self.ram = GuestRam([2 << 20])
        self.fe.set_mem_table(self.ram)
        self.ring = DriverRing(self.ram, 2 * pairs if mq else 2, 16)
        self.fe.start_ring(self.ring)

    def command(self, cls: int, cmd: int, data: bytes = b"", ack: bool = True) -> tuple[int, int]:
        out = self.ram.alloc(2 + len(data))
        self.ram.write(out, bytes([cls, cmd]) + data)
        bufs = [Buf(out, 2 + len(data))]
        ack_gpa = self.ram.alloc(1, 1)
        self.ram.write(ack_gpa, b"\xee")
        if ack:
            bufs.append(Buf(ack_gpa, 1, writable=True))
        self.ring.submit(bufs)
        self.ring.kick()
        ((_, used_len),) = self.ring.wait_used(1)
        return self.ram.read(ack_gpa, 1)[0], used_len

    def close(self) -> None:
        self.fe.close()


def _null_net(tmp: Path, pairs: int = 2) -> vhostd_proc.Vhostd:
    sock = tmp / "n.sock"
    return vhostd_proc.Vhostd(["net", "--backend", "null", "--queue-pairs", str(pairs), "--socket-path",
                               str(sock), "--control-socket", str(tmp / "control.sock")], sock, tmp / "n.log")


MAC = bytes.fromhex("525400123456")


@pytest.mark.parametrize("cls, cmd, data, expected", [
    (4, 0, struct.pack("<H", 1), OK),          # MQ VQ_PAIRS_SET 1
    (4, 0, struct.pack("<H", 2), OK),
    (4, 0, struct.pack("<H", 0), ERR),         # below 1
    (4, 0, struct.pack("<H", 3), ERR),         # above max_virtqueue_pairs
    (4, 0, b"\x01", ERR),                      # short
    (4, 1, struct.pack("<H", 1), ERR),         # unknown MQ command (RSS not offered)
    (0, 0, b"\x01", OK),                       # RX PROMISC on
    (0, 5, b"\x00", OK),                       # RX NOBCAST off
    (0, 6, b"\x01", ERR),                      # unknown RX command
    (0, 0, b"\x01\x00", ERR),                  # RX with two bytes
    (1, 1, MAC, OK),                           # MAC ADDR_SET
    (1, 1, MAC[:5], ERR),
    (1, 0, struct.pack("<I", 1) + MAC + struct.pack("<I", 0), OK),        # MAC TABLE_SET
    (1, 0, struct.pack("<I", 2) + MAC + struct.pack("<I", 0), ERR),       # entries past the data
    (1, 0, struct.pack("<I", 0xFFFFFFFF), ERR),                            # huge count
    (1, 0, struct.pack("<I", 0) + struct.pack("<I", 0) + b"x", ERR),      # trailing bytes
    (3, 0, b"", OK),                           # ANNOUNCE ACK
    (2, 0, struct.pack("<H", 5), ERR),         # VLAN: not offered
    (9, 0, b"", ERR),                          # unknown class
])
def test_control_commands_are_acknowledged_correctly(tmp_path: Path, cls: int, cmd: int,
                                                     data: bytes, expected: int) -> None:
    with _null_net(tmp_path) as v:
        c = Ctrl(v.listening_socket, pairs=2)
        assert c.command(cls, cmd, data) == (expected, 1)
        c.close()


def test_control_state_is_visible_and_a_chain_without_ack_byte_is_returned_empty(tmp_path: Path) -> None:
    with _null_net(tmp_path) as v:
        c = Ctrl(v.listening_socket, pairs=2)
        assert c.command(4, 0, struct.pack("<H", 1))[0] == OK
        assert c.command(0, 0, b"\x01")[0] == OK
        assert c.command(1, 1, MAC)[0] == OK
        assert c.command(0, 0, b"\x01", ack=False) == (0xEE, 0)
        out = subprocess.run([sys.executable, "-m", "vhostd", "status", "--json", "--control",
                              str(tmp_path / "control.sock")], check=True, capture_output=True, text=True)
        dev = json.loads(out.stdout)["devices"][0]
        assert dev["device"]["ctrl"]["active_pairs"] == 1 and dev["device"]["ctrl"]["rx_mode"] == 1
        assert "CTRL_VQ" in dev["features"] and dev["rings"][4]["running"]
        assert dev["rings"][4]["errors"] == 1
        c.close()


def test_without_mq_the_control_queue_is_ring_2(tmp_path: Path) -> None:
    with _null_net(tmp_path) as v:
        c = Ctrl(v.listening_socket, pairs=2, mq=False)
        assert c.command(0, 0, b"\x01") == (OK, 1)
        c.close()
