"""A Linux guest's own virtio-blk driver (QEMU 7.2, TCG) on vhostd disks:
DISCARD, WRITE_ZEROES, fstrim on ext4, fio trim+write with verification,
the write-cache switch, and an online resize under I/O."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import guestvm
import vhostd_proc

pytestmark = pytest.mark.guest

MIB = 1 << 20
VHOSTD = [sys.executable, "-m", "vhostd"]
SEEK_DATA, SEEK_HOLE = 3, 4


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def is_hole(path: Path, start: int, length: int) -> bool:
    """[start, start+length) holds no data blocks (SEEK_DATA finds none there)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            nxt = os.lseek(fd, start, SEEK_DATA)
        except OSError:
            return True           # no data after start at all
        return nxt >= start + length
    finally:
        os.close(fd)


def test_discard_write_zeroes_fstrim_and_the_write_cache_from_a_guest(tmp_path: Path) -> None:
    guestvm.require_guest()
    raw = tmp_path / "raw.img"
    with open(raw, "wb") as f:              # fully allocated, non-zero
        f.write(os.urandom(64 * MIB))
    fs = vhostd_proc.sparse_image(tmp_path / "fs.img", 256 * MIB)
    a = vhostd_proc.blk(tmp_path, raw, name="raw")
    b = vhostd_proc.blk(tmp_path, fs, name="fs")
    # Busybox's shell runs its own applet for a bare name: util-linux's by path.
    script = f"""
set -e
BLKDISCARD={shutil.which("blkdiscard")}
Q=/sys/block/vda/queue
echo "LIMITS $(cat $Q/discard_max_bytes) $(cat $Q/write_zeroes_max_bytes) $(cat $Q/discard_granularity)"
echo "CACHE-BEFORE $(cat /sys/block/vda/cache_type) / $(cat $Q/write_cache)"
$BLKDISCARD -o $((4 << 20)) -l $((4 << 20)) /dev/vda
$BLKDISCARD -z -o $((12 << 20)) -l $((4 << 20)) /dev/vda
# virtio_blk's own switch (queue/write_cache only changes the block layer's view)
echo "write through" > /sys/block/vda/cache_type
echo "CACHE-AFTER $(cat /sys/block/vda/cache_type) / $(cat $Q/write_cache)"
echo 'after write-through' | dd of=/dev/vda bs=512 seek=40000 conv=sync 2>/dev/null
echo "write back" > /sys/block/vda/cache_type
fio --name=tw --filename=/dev/vda --offset=32M --size=16M --rw=trimwrite --bs=64k --direct=1 \\
    --ioengine=psync --verify=crc32c --verify_fatal=1 --output-format=terse >/tmp/fio.out
echo FIO-TRIMWRITE-OK
{shutil.which("mke2fs")} -q -t ext4 -E nodiscard /dev/vdb
mkdir -p /mnt/fs && mount -t ext4 /dev/vdb /mnt/fs
dd if=/dev/urandom of=/mnt/fs/big bs=1M count=96 2>/dev/null
sync
echo WROTE-96
rm /mnt/fs/big
sync
fstrim -v /mnt/fs
umount /mnt/fs
echo GUEST-DONE
"""
    try:
        res = guestvm.run_guest(script, [*guestvm.vhost_user_blk_args(tmp_path / "raw.sock", chardev_id="c0"),
                                         *guestvm.vhost_user_blk_args(tmp_path / "fs.sock", chardev_id="c1")],
                                timeout=240)
        assert res.rc == 0 and "GUEST-DONE" in res.output, res.describe()
        lim = re.search(r"LIMITS (\d+) (\d+) (\d+)", res.output)
        assert lim and int(lim[1]) > 0 and int(lim[2]) > 0, res.output       # the driver took both features
        assert "CACHE-BEFORE write back / write back" in res.output, res.output
        assert "CACHE-AFTER write through / write through" in res.output, res.output
        assert "raw: write cache write-through (the guest's choice)" in a.log()
        assert "raw: write cache write-back (the guest's choice)" in a.log()
        data = raw.read_bytes()
        assert data[4 * MIB: 8 * MIB] == bytes(4 * MIB) and is_hole(raw, 4 * MIB, 4 * MIB)    # discarded
        assert data[12 * MIB: 16 * MIB] == bytes(4 * MIB)                                     # zeroed
        assert data[:4 * MIB] != bytes(4 * MIB) and data[8 * MIB: 12 * MIB] != bytes(4 * MIB)  # neighbours kept
        assert data[40000 * 512: 40000 * 512 + 19] == b"after write-through"
        # 96 MiB were written into the file system, deleted, trimmed: the image gave them back.
        assert "WROTE-96" in res.output
        print(f"\nfs image after fstrim: {allocated(fs) >> 20} MiB allocated; {res.output.splitlines()[-2]}")
        assert allocated(fs) < 48 * MIB, f"{allocated(fs) >> 20} MiB still allocated after fstrim"
        assert a.alive() and b.alive() and "guest error" not in a.log() + b.log()
    finally:
        a.stop()
        b.stop()


def test_the_disk_grows_under_a_running_guest(tmp_path: Path) -> None:
    guestvm.require_guest()
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", 128 * MIB)
    ctl = tmp_path / "ctl.sock"
    d = vhostd_proc.Vhostd(["blk", "--name", "grow", "--socket-path", str(tmp_path / "grow.sock"), "--file",
                            str(image), "--control-socket", str(ctl)], tmp_path / "grow.sock", tmp_path / "grow.log")
    script = """
S=/sys/block/vda/size
echo "SIZE-BEFORE $(cat $S)"
fio --name=bg --filename=/dev/vda --size=64M --rw=randrw --bs=4k --direct=1 --ioengine=psync \\
    --verify=crc32c --verify_fatal=1 --time_based --runtime=20 --output-format=terse >/tmp/fio.out 2>&1 &
F=$!
echo FIO-STARTED
n=0
while [ "$(cat $S)" = 262144 ]; do sleep 0.5; n=$((n + 1)); [ $n -lt 120 ] || { echo "NO RESIZE"; exit 1; }; done
new=$(cat $S)
echo "SIZE-AFTER $new"
echo 'the new last sector' | dd of=/dev/vda bs=512 seek=$((new - 1)) conv=sync oflag=direct 2>/dev/null
echo "LAST $(dd if=/dev/vda bs=512 skip=$((new - 1)) count=1 iflag=direct 2>/dev/null | head -c 19)"
wait $F && echo FIO-OK
dmesg | grep -i "capacity change" | tail -1
"""
    try:
        g = guestvm.start_guest(script, guestvm.vhost_user_blk_args(tmp_path / "grow.sock"), timeout=240)
        with g:
            assert g.wait_for("FIO-STARTED", 120), g.console
            time.sleep(2)
            r = subprocess.run([*VHOSTD, "resize", "--control", str(ctl), "grow", "192M"], capture_output=True,
                               text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip() == "grow: 134217728 -> 201326592 bytes; the front-end was told"
            res = g.result()
        assert res.rc == 0 and "FIO-OK" in res.output, res.describe()
        assert "SIZE-BEFORE 262144" in res.output and "SIZE-AFTER 393216" in res.output
        assert "LAST the new last sector" in res.output
        assert "capacity change" in res.output, res.output
        with open(image, "rb") as f:
            f.seek(192 * MIB - 512)
            assert f.read(19) == b"the new last sector"
    finally:
        d.stop()
