"""Data safety and least privilege: acknowledged writes survive kill -9,
unacknowledged ones are never torn into a neighbour's data; sockets are
private to their owner (or a chosen group)."""

from __future__ import annotations

import grp
import os
import random
import signal
import stat
import struct
import time
from pathlib import Path

import pytest

import vhostd_proc
from vhostd.frontend import BlkDriver, Buf, DriverRing, Frontend, GuestRam
from vhostd.protocol.constants import ProtocolFeature, VirtioFeature, bit

PROTO = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
FEATURES = (bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
            | bit(VirtioFeature.RING_INDIRECT_DESC))
SECTORS = 2048


def _session(sock: Path, ram_mb: int = 16) -> tuple[Frontend, GuestRam, DriverRing]:
    fe = Frontend(str(sock))
    fe.negotiate(FEATURES, PROTO)
    ram = GuestRam([ram_mb << 20])
    fe.set_mem_table(ram)
    ring = DriverRing(ram, 0, 256)
    fe.start_ring(ring)
    return fe, ram, ring


def _sector_pattern(sector: int, gen: int) -> bytes:
    return struct.pack("<QQ", sector, gen) * 32


@pytest.mark.parametrize("engine", ["io_uring", "sync"])
def test_write_acknowledged_after_flush_survives_kill_9(tmp_path: Path, engine: str) -> None:
    image = vhostd_proc.sparse_image(tmp_path / "d.img", SECTORS * 512)
    v = vhostd_proc.blk(tmp_path, image, "--aio", engine)
    fe, ram, ring = _session(v.listening_socket)
    drv = BlkDriver(ring)
    for s in range(0, 64):
        assert drv.write(s, _sector_pattern(s, 1)).status == 0
    assert drv.flush().status == 0
    v.stop(signal.SIGKILL)
    fe.close()
    data = image.read_bytes()
    for s in range(0, 64):
        assert data[s * 512:(s + 1) * 512] == _sector_pattern(s, 1), f"sector {s} lost"


def test_unacknowledged_writes_are_never_torn_into_neighbours(tmp_path: Path) -> None:
    """Many 4 KiB writes in flight, vhostd killed at a random moment: every
    4 KiB block afterwards holds either its old or its new content, never
    another block's data or a mix of the two."""
    image = tmp_path / "d.img"
    blocks = SECTORS // 8
    image.write_bytes(b"".join(_sector_pattern(b, 0) * 8 for b in range(blocks)))
    v = vhostd_proc.blk(tmp_path, image)
    fe, ram, ring = _session(v.listening_socket, ram_mb=32)
    rng = random.Random(7)
    # Queue 200 block writes at once, then kill mid-stream.
    bufs = []
    for b in range(blocks):
        hdr = ram.alloc(16)
        ram.write(hdr, struct.pack("<IIQ", 1, 0, b * 8))
        data = ram.alloc(4096, 4096)
        ram.write(data, _sector_pattern(b, 1) * 8)
        st = ram.alloc(1, 1)
        bufs.append([Buf(hdr, 16), Buf(data, 4096), Buf(st, 1, writable=True)])
    order = list(range(blocks))
    rng.shuffle(order)
    submitted = 0
    for b in order[:200]:
        ring.submit(bufs[b], indirect=True)
        submitted += 1
    ring.kick()
    time.sleep(rng.uniform(0.0, 0.005))
    v.stop(signal.SIGKILL)
    fe.close()
    disk = image.read_bytes()
    new = 0
    for b in range(blocks):
        got = disk[b * 4096:(b + 1) * 4096]
        assert got in (_sector_pattern(b, 0) * 8, _sector_pattern(b, 1) * 8), f"block {b} torn or misplaced"
        new += got == _sector_pattern(b, 1) * 8
    assert new <= submitted


def test_socket_is_private_by_default_and_group_when_asked(tmp_path: Path) -> None:
    image = vhostd_proc.sparse_image(tmp_path / "d.img", 1 << 20)
    with vhostd_proc.blk(tmp_path, image) as v:
        st = os.stat(v.listening_socket)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    group = grp.getgrgid(os.getgroups()[-1] if os.getgroups() else os.getgid())
    with vhostd_proc.blk(tmp_path, image, "--socket-group", group.gr_name, name="grp") as v:
        st = os.stat(v.listening_socket)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid


def test_only_one_frontend_at_a_time(tmp_path: Path) -> None:
    image = vhostd_proc.sparse_image(tmp_path / "d.img", 1 << 20)
    with vhostd_proc.blk(tmp_path, image) as v:
        fe, ram, ring = _session(v.listening_socket)
        second = Frontend(str(v.socket))
        assert second.is_closed(), "a second front-end must be refused"
        second.close()
        assert BlkDriver(ring).read(0, 512).status == 0
        assert "refusing a second front-end" in v.log()
        fe.close()
