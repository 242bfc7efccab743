"""virtio-blk beyond read/write, through a real `vhostd blk` and the Python
front-end: the write-cache switch (CONFIG_WCE), online resize announced on
the back-end channel (BACKEND_REQ), and a front-end that misuses that
channel (never answers, closes it, refuses)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import vhostd_proc
from vhd_helpers import LoopFactory
from vhostd.frontend import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, BlkDriver, DriverRing, Frontend, GuestRam
from vhostd.protocol.constants import HeaderFlag, ProtocolFeature, Request, bit
from vhostd.protocol.messages import Config

MIB = 1 << 20
VHOSTD = [sys.executable, "-m", "vhostd"]
CONFIG_CHANGE_MSG = 2
WANT_PROTO = (bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
              | bit(ProtocolFeature.BACKEND_REQ))


@dataclass
class BackendPeer:
    """The front-end's end of the back-end channel, answering as told:
    "ok", "refuse", "close" or "mute" (never reads)."""

    sock: socket.socket
    mode: str
    received: list[tuple[int, int]] = field(default_factory=list)

    def serve(self) -> None:
        if self.mode == "mute":
            return
        while True:
            try:
                hdr = self.sock.recv(12, socket.MSG_WAITALL)
            except OSError:
                return
            if len(hdr) < 12:
                return
            request, flags, size = struct.unpack("<III", hdr)
            if size:
                self.sock.recv(size, socket.MSG_WAITALL)
            self.received.append((request, flags))
            if self.mode == "close":
                self.sock.close()
                return
            if flags & HeaderFlag.NEED_REPLY:
                status = 0 if self.mode == "ok" else 1
                self.sock.sendall(struct.pack("<IIIQ", request, HeaderFlag.VERSION | HeaderFlag.REPLY, 8, status))


@dataclass
class Disk:
    daemon: vhostd_proc.Vhostd
    image: Path
    control: Path
    fe: Frontend
    blk: BlkDriver
    ram: GuestRam

    def resize(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VHOSTD, "resize", "--control", str(self.control), "disk", *args],
                              capture_output=True, text=True, timeout=30)

    def capacity(self) -> int:
        return int(struct.unpack("<Q", self.fe.get_config(8))[0])


def start_disk(tmp: Path, size: int = 4 * MIB, file: Path | None = None,
               backend: str | None = "ok") -> tuple[Disk, BackendPeer | None]:
    image = file or vhostd_proc.sparse_image(tmp / "disk.img", size)
    ctl = tmp / "ctl.sock"
    d = vhostd_proc.Vhostd(["blk", "--name", "disk", "--socket-path", str(tmp / "d.sock"), "--file", str(image),
                            "--control-socket", str(ctl)], tmp / "d.sock", tmp / "d.log")
    fe = Frontend(str(tmp / "d.sock"))
    fe.negotiate(~0, WANT_PROTO)
    peer = None
    if backend is not None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        assert fe.call_ack(Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()]) == 0
        theirs.close()
        peer = BackendPeer(ours, backend)
        threading.Thread(target=peer.serve, daemon=True).start()
    ram = GuestRam([MIB, MIB])
    fe.set_mem_table(ram)
    ring = DriverRing(ram, 0, 32)
    fe.start_ring(ring)
    return Disk(d, image, ctl, fe, BlkDriver(ring), ram), peer


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[tuple[Disk, BackendPeer | None]]:
    d, peer = start_disk(tmp_path)
    yield d, peer
    d.fe.close()
    d.daemon.stop()
    d.ram.close()


def test_resize_grows_the_disk_and_tells_the_front_end(disk: tuple[Disk, BackendPeer | None]) -> None:
    d, peer = disk
    assert peer is not None
    assert d.capacity() == 4 * MIB // 512
    assert d.blk.write(8192, b"n" * 512).status == VIRTIO_BLK_S_IOERR      # past the old end
    r = d.resize("6M")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "disk: 4194304 -> 6291456 bytes; the front-end was told"
    assert peer.received == [(CONFIG_CHANGE_MSG, HeaderFlag.VERSION | HeaderFlag.NEED_REPLY)]
    assert os.path.getsize(d.image) == 6 * MIB
    assert d.capacity() == 6 * MIB // 512
    assert d.blk.write(12287, b"n" * 512).status == VIRTIO_BLK_S_OK        # the new last sector
    r2 = d.blk.read(12287, 512)
    assert r2.status == VIRTIO_BLK_S_OK and r2.data == b"n" * 512
    assert "disk: resized from 4194304 to 6291456 bytes" in d.daemon.log()


def test_resize_without_a_size_takes_the_files_size_and_shrinking_needs_the_flag(
        disk: tuple[Disk, BackendPeer | None]) -> None:
    d, _ = disk
    os.truncate(d.image, 5 * MIB)                         # the operator grew the file
    r = d.resize()
    assert r.returncode == 0 and "4194304 -> 5242880" in r.stdout, r.stdout + r.stderr
    r = d.resize("2M")
    assert r.returncode != 0 and "would shrink the disk from 5242880: pass --shrink" in r.stderr
    assert "Traceback" not in r.stderr
    assert os.path.getsize(d.image) == 5 * MIB
    r = d.resize("2M", "--shrink")
    assert r.returncode == 0, r.stderr
    assert d.blk.read(4096, 512).status == VIRTIO_BLK_S_IOERR             # past the new end
    r = d.resize("3X")
    assert r.returncode != 0 and "is not a size" in r.stderr


@pytest.mark.parametrize("mode, told", [
    ("refuse", "the front-end was not told: the front-end refused CONFIG_CHANGE_MSG (status 1)"),
    ("close", "the front-end was not told: the front-end closed the back-end channel during CONFIG_CHANGE_MSG"),
    ("mute", "the front-end was not told: no answer to CONFIG_CHANGE_MSG within 5 s: channel closed"),
])
def test_a_front_end_that_misuses_the_back_end_channel_holds_nothing_up(tmp_path: Path, mode: str,
                                                                          told: str) -> None:
    d, _ = start_disk(tmp_path, backend=mode)
    try:
        result: list[subprocess.CompletedProcess[str]] = []
        t = threading.Thread(target=lambda: result.append(d.resize("8M")))
        t.start()
        # Meanwhile the session answers on the main channel (QEMU reads the
        # new config there before it answers the back-end channel).
        time.sleep(0.5)
        assert d.capacity() == 8 * MIB // 512
        assert d.blk.read(0, 512).status == VIRTIO_BLK_S_OK
        t.join(30)
        assert result and result[0].returncode == 0, result
        assert result[0].stdout.strip() == f"disk: 4194304 -> 8388608 bytes; {told}"
        assert d.daemon.alive()
        assert d.resize("9M").returncode == 0                  # and again, channel gone or not
        assert d.blk.read(9 * MIB // 512 - 1, 512).status == VIRTIO_BLK_S_OK
    finally:
        d.fe.close()
        d.daemon.stop()
        d.ram.close()


def test_without_a_back_end_channel_the_resize_says_so(tmp_path: Path) -> None:
    d, _ = start_disk(tmp_path, backend=None)
    try:
        r = d.resize("5M")
        assert r.returncode == 0
        assert "the front-end gave no back-end channel" in r.stdout
        assert d.capacity() == 5 * MIB // 512
    finally:
        d.fe.close()
        d.daemon.stop()
        d.ram.close()


def set_writeback(fe: Frontend, on: bool) -> None:
    """Acknowledged (REPLY_ACK), as QEMU sends it: the guest's next write
    comes only after."""
    assert fe.call_ack(Request.SET_CONFIG, Config(32, 1, 0, bytes([int(on)])).pack()) == 0


def test_the_guest_switches_the_write_cache(disk: tuple[Disk, BackendPeer | None]) -> None:
    d, _ = disk
    assert d.fe.get_config(1, offset=32) == b"\x01"              # write-back by default
    set_writeback(d.fe, False)
    assert d.fe.get_config(1, offset=32) == b"\x00"
    assert d.blk.write(0, b"w" * 512).status == VIRTIO_BLK_S_OK
    assert "disk: write cache write-through (the guest's choice)" in d.daemon.log()
    assert d.fe.call_ack(Request.SET_CONFIG, Config(32, 1, 0, b"\x02").pack()) == 1   # not 0 or 1: refused
    assert d.fe.get_config(1, offset=32) == b"\x00"
    out = subprocess.run([*VHOSTD, "status", "--json", "--control", str(d.control)], capture_output=True,
                         text=True, check=True).stdout
    assert '"write_cache": "write-through"' in out


def lower_layer(backing: Path, offset: int) -> bytes:
    """What reached the layer below the disk: the loop device's backing file,
    read around the loop device's own page cache."""
    fd = os.open(backing, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, 4096)
        os.preadv(fd, [buf], offset)
        return bytes(buf[:512])
    finally:
        os.close(fd)


@pytest.mark.root
def test_write_through_makes_an_acknowledged_write_durable_without_a_flush(
        tmp_path: Path, loop_device: LoopFactory) -> None:
    """A write that only reached the page cache survives kill -9 of vhostd but
    not a power cut.  Served from a loop device, write-back leaves the data
    in the loop device's page cache (dirty, for ~30 s), write-through
    (RWF_DSYNC) has it in the backing file when the guest gets its status."""
    dev, backing = loop_device(bytes(4 * MIB))
    d, _ = start_disk(tmp_path, file=Path(dev), backend=None)
    try:
        assert d.blk.write(16, b"B" * 512).status == VIRTIO_BLK_S_OK          # write-back
        assert lower_layer(backing, 16 * 512) == bytes(512), "write-back reached the disk at once: no contrast"
        set_writeback(d.fe, False)
        assert d.blk.write(24, b"T" * 512).status == VIRTIO_BLK_S_OK          # write-through
        assert lower_layer(backing, 24 * 512) == b"T" * 512
        d.daemon.stop(9)
        assert lower_layer(backing, 24 * 512) == b"T" * 512
    finally:
        d.fe.close()
        d.daemon.stop()
        d.ram.close()
