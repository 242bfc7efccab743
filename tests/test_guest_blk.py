"""virtio-blk through vhostd, driven by a real Linux guest's virtio_blk driver
(QEMU 7.2 under TCG, Debian's kernel, busybox initramfs: tests/guestvm.py)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

import guestvm
import vhostd_proc
from vhostd.frontend import BlkDriver, DriverRing, Frontend, GuestRam
from vhostd.protocol.constants import ProtocolFeature, bit

pytestmark = pytest.mark.guest

MIB = 1 << 20
DISK_SIZE = 64 * MIB
LAST_SECTOR = DISK_SIZE // 512 - 1
# (name, byte offset, length): sector-aligned writes all over the disk, the last sector included.
PATTERNS = [("start", 0, 4096), ("odd", 1 * MIB + 512, 1536), ("mid", 32 * MIB, 65536),
            ("last", LAST_SECTOR * 512, 512)]


def _write_patterns_script() -> str:
    lines = []
    for name, off, length in PATTERNS:
        lines += [
            f"dd if=/dev/urandom of=/tmp/{name} bs=512 count={length // 512} 2>/dev/null",
            f"dd if=/tmp/{name} of=/dev/vda bs=512 seek={off // 512} conv=fsync 2>/dev/null",
            f"echo 3 > /proc/sys/vm/drop_caches",
            f"dd if=/dev/vda of=/tmp/{name}.back bs=512 skip={off // 512} count={length // 512} iflag=direct 2>/dev/null",
            f"cmp /tmp/{name} /tmp/{name}.back && echo PATTERN {name} $(md5sum < /tmp/{name} | cut -c1-32)",
        ]
    return "\n".join(lines)


def _read_patterns_script() -> str:
    return "\n".join(
        f"echo READ {name} $(dd if=/dev/vda bs=512 skip={off // 512} count={length // 512} "
        f"iflag=direct 2>/dev/null | md5sum | cut -c1-32)"
        for name, off, length in PATTERNS)


def _md5_of(image: Path, off: int, length: int) -> str:
    with open(image, "rb") as f:
        f.seek(off)
        return hashlib.md5(f.read(length)).hexdigest()


def _disk_by_serial(serial: str) -> str:
    """Shell snippet: sets $D to the /dev node whose virtio serial is `serial`."""
    return (f'D=""; for b in /sys/block/vd*; do [ "$(cat $b/serial)" = "{serial}" ] && '
            f'D=/dev/${{b##*/}}; done; [ -n "$D" ] || {{ echo "no disk {serial}"; exit 1; }}')


FIO_VERIFY = ("fio --name=verify --filename=$D --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio "
              "--direct=1 --offset=2M --size=12M --numjobs=2 --offset_increment=12M --loops=2 "
              "--verify=crc32c --verify_fatal=1 --group_reporting --output-format=terse")
# Two jobs on two vCPUs: each CPU has its own virtio queue.
FIO = FIO_VERIFY + " --cpus_allowed=0,1 --cpus_allowed_policy=split"


def test_guest_io_fio_two_queues_readonly_and_reboot(tmp_path: Path) -> None:
    guestvm.require_guest()
    rw_image = vhostd_proc.sparse_image(tmp_path / "rw.img", DISK_SIZE)
    ro_image = tmp_path / "ro.img"
    ro_image.write_bytes(b"R" * MIB)
    with vhostd_proc.blk(tmp_path, rw_image, "--num-queues", "2", "--serial", "vhd-rw", name="rw") as rw, \
            vhostd_proc.blk(tmp_path, ro_image, "--read-only", "--serial", "vhd-ro", name="ro") as ro:
        qemu = (guestvm.vhost_user_blk_args(rw.listening_socket, num_queues=2, chardev_id="rw")
                + guestvm.vhost_user_blk_args(ro.listening_socket, chardev_id="ro"))
        script = f"""
set -e
{_disk_by_serial("vhd-ro")}
echo RO-FLAG $(cat /sys/block/${{D##*/}}/ro)
dd if=$D bs=512 count=1 2>/dev/null | head -c 4; echo
if dd if=/dev/zero of=$D bs=512 count=1 conv=fsync 2>/dev/null; then echo RO-WRITE-ACCEPTED; else echo RO-WRITE-REFUSED; fi
{_disk_by_serial("vhd-rw")}
[ "$D" = /dev/vda ] || {{ echo "rw disk is $D"; exit 1; }}
echo SIZE $(cat /sys/block/vda/size)
echo QUEUES $(ls /sys/block/vda/mq | wc -l)
{_write_patterns_script()}
{FIO} > /tmp/fio.out
echo FIO-ERR $(grep -v '^fio:' /tmp/fio.out | cut -d';' -f5)
"""
        first = guestvm.run_guest(script, qemu, smp=2, timeout=240)
        out = first.output
        assert first.rc == 0, first.describe()
        assert "RO-FLAG 1" in out and "RRRR" in out and "RO-WRITE-REFUSED" in out, first.describe()
        assert f"SIZE {DISK_SIZE // 512}" in out
        assert "QUEUES 2" in out
        assert "FIO-ERR 0" in out, first.describe()
        for name, off, length in PATTERNS:
            m = re.search(rf"PATTERN {name} ([0-9a-f]{{32}})", out)
            assert m, f"pattern {name} not verified in the guest:\n{first.describe()}"
            assert _md5_of(rw_image, off, length) == m.group(1), f"host file differs at {name}"
        assert ro_image.read_bytes() == b"R" * MIB
        # Both queues carried requests: each ring reported a non-zero avail index when stopped.
        stops = {int(q): int(n) for q, n in re.findall(r"rw: ring (\d) stopped at (\d+)", rw.log())}
        assert stops.get(0, 0) > 0 and stops.get(1, 0) > 0, stops

        # Reboot: a second QEMU on the same vhostd, without restarting it, sees the data.
        second = guestvm.run_guest(_read_patterns_script(), qemu, timeout=120)
        assert second.rc == 0, second.describe()
        for name, off, length in PATTERNS:
            assert f"READ {name} {_md5_of(rw_image, off, length)}" in second.output, second.describe()
        assert rw.alive() and ro.alive()
        assert rw.log().count("front-end connected") == 2


def test_guest_killed_mid_io_leaves_vhostd_serving(tmp_path: Path) -> None:
    guestvm.require_guest()
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", DISK_SIZE)
    with vhostd_proc.blk(tmp_path, image) as v:
        script = ("echo FIO-RUNNING; fio --name=busy --filename=/dev/vda --rw=randrw --bs=4k "
                  "--iodepth=32 --ioengine=libaio --direct=1 --time_based --runtime=60 "
                  "--output-format=terse >/dev/null")
        with guestvm.start_guest(script, guestvm.vhost_user_blk_args(v.listening_socket), timeout=120) as g:
            assert g.wait_for("FIO-RUNNING", 60), g.console
            # Let fio get requests in flight, then pull the plug on QEMU.
            assert _wait_log(v, "ring 0 started", 30)
            import time
            time.sleep(2)
            g.kill()
        assert _wait_log(v, "front-end disconnected", 10), v.log()
        assert v.alive()
        # The next front-end gets a working device.
        fe = Frontend(str(v.socket))
        try:
            fe.negotiate(~0, bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG))
            ram = GuestRam([4 * MIB])
            fe.set_mem_table(ram)
            ring = DriverRing(ram, 0, 64)
            fe.start_ring(ring)
            drv = BlkDriver(ring)
            assert drv.write(100, b"\xa5" * 4096).status == 0
            res = drv.read(100, 4096)
            assert res.status == 0 and res.data == b"\xa5" * 4096
        finally:
            fe.close()
        with open(image, "rb") as f:
            f.seek(100 * 512)
            assert f.read(4096) == b"\xa5" * 4096


def _wait_log(v: vhostd_proc.Vhostd, text: str, timeout: float) -> bool:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in v.log():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("engine_args", [["--aio", "sync"], ["--direct"]], ids=["sync", "io_uring+O_DIRECT"])
def test_guest_fio_verify_other_engines(tmp_path: Path, engine_args: list[str]) -> None:
    guestvm.require_guest()
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", DISK_SIZE)
    with vhostd_proc.blk(tmp_path, image, *engine_args) as v:
        script = (f"D=/dev/vda\n{FIO_VERIFY} > /tmp/fio.out\n"
                  "echo FIO-ERR $(grep -v '^fio:' /tmp/fio.out | cut -d';' -f5)")
        res = guestvm.run_guest(script, guestvm.vhost_user_blk_args(v.listening_socket), timeout=180)
        assert res.rc == 0 and "FIO-ERR 0" in res.output, res.describe()
        assert v.alive()
