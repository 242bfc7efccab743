"""virtio-blk DISCARD and WRITE_ZEROES (virtio 1.2 5.2.6.2) in the C data
plane, on both engines, on a regular file and on a loop block device:
what each request does to the file, and every rejection path (the file is
left untouched and the status says why)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from vhd_helpers import SECTOR, LoopFactory, Rig
from vhostd.devices.blk import MAX_TRIM_SECTORS, MAX_TRIM_SEG, ZEROES_PUNCH, ZEROES_RANGE, _zeroing_mode
from vhostd.frontend import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP
from vhostd.native import NativeBlk

pytestmark = pytest.mark.usefixtures("watchdog")

RigFactory = Callable[..., Rig]
T_DISCARD, T_WRITE_ZEROES = 11, 13
UNMAP = 1
DISCARD_IGNORE, DISCARD_UNMAP = 1, 2
SECTORS = 4096          # 2 MiB


def seg(sector: int, n: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, n, flags)


def set_trim(blk: NativeBlk, discard: int = DISCARD_UNMAP, zeroes: int = ZEROES_RANGE,
             may_unmap: bool = True) -> None:
    blk.set_trim(discard=discard, zeroes=zeroes, may_unmap=may_unmap, max_discard_sectors=MAX_TRIM_SECTORS,
                 max_discard_seg=MAX_TRIM_SEG, max_zeroes_sectors=MAX_TRIM_SECTORS, max_zeroes_seg=MAX_TRIM_SEG)


def run(rig: Rig, engine: str) -> None:
    if engine == "sync":
        rig.process()
    else:
        rig.process_uring()


def blocks(path: Path) -> int:
    return os.stat(path).st_blocks


@pytest.fixture(params=["sync", "io_uring"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rig(rig_factory: RigFactory) -> Rig:
    r = rig_factory(region_sizes=(1 << 20, 1 << 20), sectors=SECTORS)
    set_trim(r.blk, zeroes=_zeroing_mode(r.fd, r.image))
    os.fsync(r.fd)
    return r


def test_discard_punches_a_hole_that_reads_zeros(rig: Rig, engine: str) -> None:
    before = blocks(rig.image)
    req = rig.request(T_DISCARD, 0, data=seg(256, 256) + seg(1024, 128))    # two segments, 4 KiB aligned
    run(rig, engine)
    assert rig.status_of(req) == VIRTIO_BLK_S_OK
    data = rig.file()
    assert data[256 * SECTOR: 512 * SECTOR] == bytes(256 * SECTOR)
    assert data[1024 * SECTOR: 1152 * SECTOR] == bytes(128 * SECTOR)
    keep = rig.initial
    assert data[:256 * SECTOR] == keep[:256 * SECTOR] and data[512 * SECTOR:1024 * SECTOR] == keep[512 * SECTOR:1024 * SECTOR]
    assert data[1152 * SECTOR:] == keep[1152 * SECTOR:]
    assert blocks(rig.image) <= before - 384 * SECTOR // 512, "the hole gave no space back"


@pytest.mark.parametrize("unmap", [False, True], ids=["keep-allocated", "unmap"])
def test_write_zeroes(rig: Rig, engine: str, unmap: bool) -> None:
    before = blocks(rig.image)
    req = rig.request(T_WRITE_ZEROES, 0, data=seg(8, 504, UNMAP if unmap else 0))
    run(rig, engine)
    assert rig.status_of(req) == VIRTIO_BLK_S_OK
    data = rig.file()
    assert data[8 * SECTOR: 512 * SECTOR] == bytes(504 * SECTOR)
    assert data[:8 * SECTOR] == rig.initial[:8 * SECTOR] and data[512 * SECTOR:] == rig.initial[512 * SECTOR:]
    if unmap:    # may_unmap: the device punched the (whole) blocks
        assert blocks(rig.image) < before


def test_discard_ignore_acknowledges_and_keeps_the_data(rig: Rig, engine: str) -> None:
    set_trim(rig.blk, discard=DISCARD_IGNORE)
    req = rig.request(T_DISCARD, 0, data=seg(0, 512))
    run(rig, engine)
    assert rig.status_of(req) == VIRTIO_BLK_S_OK
    assert rig.file() == rig.initial


REJECTED = [
    ("reserved flag", T_WRITE_ZEROES, seg(0, 8, 2), VIRTIO_BLK_S_UNSUPP),
    ("unmap on discard", T_DISCARD, seg(0, 8, UNMAP), VIRTIO_BLK_S_UNSUPP),
    ("33 segments", T_DISCARD, b"".join(seg(i * 8, 8) for i in range(33)), VIRTIO_BLK_S_UNSUPP),
    ("over the sector limit", T_WRITE_ZEROES, seg(0, MAX_TRIM_SECTORS + 1), VIRTIO_BLK_S_UNSUPP),
    ("payload not whole segments", T_DISCARD, seg(0, 8) + bytes(8), VIRTIO_BLK_S_UNSUPP),
    ("no segment", T_WRITE_ZEROES, b"", VIRTIO_BLK_S_UNSUPP),
    ("past the end", T_WRITE_ZEROES, seg(SECTORS - 8, 16), VIRTIO_BLK_S_IOERR),
    ("second segment past the end", T_DISCARD, seg(0, 8) + seg(SECTORS, 1), VIRTIO_BLK_S_IOERR),
    ("sector overflow", T_DISCARD, seg(2**63, 8), VIRTIO_BLK_S_IOERR),
]


@pytest.mark.parametrize("name,type_,payload,status", REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected_requests_leave_the_file_alone(rig: Rig, engine: str, name: str, type_: int,
                                                payload: bytes, status: int) -> None:
    req = rig.request(type_, 0, data=payload)
    run(rig, engine)
    assert rig.status_of(req) == status, name
    assert rig.file() == rig.initial


@pytest.mark.parametrize("type_", [T_DISCARD, T_WRITE_ZEROES])
def test_a_read_only_disk_refuses_both(rig_factory: RigFactory, engine: str, type_: int) -> None:
    r = rig_factory(sectors=SECTORS, readonly=True)
    set_trim(r.blk)
    req = r.request(type_, 0, data=seg(0, 8))
    run(r, engine)
    assert r.status_of(req) == VIRTIO_BLK_S_IOERR
    assert r.file() == r.initial


def test_not_offered_means_unsupported(rig_factory: RigFactory, engine: str) -> None:
    r = rig_factory(sectors=SECTORS)         # no set_trim: the device offers neither
    reqs = [r.request(t, 0, data=seg(0, 8)) for t in (T_DISCARD, T_WRITE_ZEROES)]
    run(r, engine)
    assert [r.status_of(q) for q in reqs] == [VIRTIO_BLK_S_UNSUPP] * 2
    assert r.file() == r.initial


def test_zeroing_mode_probe_uses_zero_range_where_the_file_system_has_it(tmp_path: Path) -> None:
    img = tmp_path / "x.img"
    img.write_bytes(b"x" * 8192)
    fd = os.open(img, os.O_RDWR)
    try:
        assert _zeroing_mode(fd, img) == ZEROES_RANGE          # ext4 here
        assert img.read_bytes() == b"x" * 8192                 # probed beside it, not on it
    finally:
        os.close(fd)
    shm = Path("/dev/shm") / f"vhostd-probe-{os.getpid()}"
    shm.write_bytes(bytes(8192))
    fd = os.open(shm, os.O_RDWR)
    try:
        assert _zeroing_mode(fd, shm) == ZEROES_PUNCH          # tmpfs has holes, no ZERO_RANGE
    finally:
        os.close(fd)
        shm.unlink()


# --- a loop block device -----------------------------------------------------------

@pytest.mark.root
def test_discard_and_write_zeroes_on_a_block_device(rig_factory: RigFactory, loop_device: LoopFactory,
                                                    engine: str) -> None:
    dev, backing = loop_device(bytes(range(256)) * (SECTORS * SECTOR // 256))
    r = rig_factory(region_sizes=(1 << 20, 1 << 20), sectors=SECTORS)
    fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    r.blk.close()
    r.blk = NativeBlk(fd, SECTORS, False, b"LOOP")
    try:
        assert _zeroing_mode(fd, Path(dev)) == ZEROES_RANGE
        set_trim(r.blk)
        before = blocks(backing)
        zero = r.request(T_WRITE_ZEROES, 0, data=seg(0, 64))
        discard = r.request(T_DISCARD, 0, data=seg(1024, 1024))
        past = r.request(T_DISCARD, 0, data=seg(SECTORS - 1, 2))
        run(r, engine)
        assert [r.status_of(q) for q in (zero, discard, past)] == [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK,
                                                                     VIRTIO_BLK_S_IOERR]
        os.fsync(fd)
        with open(dev, "rb") as f:
            data = f.read()
        assert data[:64 * SECTOR] == bytes(64 * SECTOR)
        assert data[1024 * SECTOR: 2048 * SECTOR] == bytes(1024 * SECTOR)   # the loop driver punches holes
        assert blocks(backing) < before
    finally:
        r.blk.close()
        os.close(fd)
