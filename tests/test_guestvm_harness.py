"""Validates tests/guestvm.py itself: a guest on QEMU's built-in virtio-blk, no vhost-user."""

from __future__ import annotations

from pathlib import Path

import pytest

import guestvm

MARK = b"vhostd-guestvm-harness-mark"
MARK_OFFSET = 48 << 20  # beyond the 16 MiB that fio overwrites

SCRIPT = f"""
set -e
test -b /dev/vda
dd if=/dev/urandom of=/tmp/in bs=64k count=64 2>/dev/null
dd if=/tmp/in of=/dev/vda bs=64k oflag=direct 2>/dev/null
dd if=/dev/vda of=/tmp/out bs=64k count=64 iflag=direct 2>/dev/null
cmp /tmp/in /tmp/out
echo DD-ROUNDTRIP-OK
printf '{MARK.decode()}' | dd of=/dev/vda bs=1M seek={MARK_OFFSET >> 20} conv=fsync 2>/dev/null
fio --name=t --filename=/dev/vda --rw=randrw --bs=4k --iodepth=16 --ioengine=libaio \\
    --direct=1 --size=16M --verify=crc32c --runtime=3 --time_based=0 --output-format=terse \\
    > /tmp/fio.out
echo "FIO-ERR=$(cut -d';' -f5 /tmp/fio.out)"
"""


@pytest.mark.guest
def test_builtin_virtio_blk_roundtrip_and_fio(tmp_path: Path) -> None:
    guestvm.require_guest()
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)

    res = guestvm.run_guest(
        SCRIPT,
        ["-drive", f"file={disk},if=none,id=d0,format=raw", "-device", "virtio-blk-pci,drive=d0"],
        timeout=180,
    )

    assert res.rc == 0, res.describe()
    assert "DD-ROUNDTRIP-OK" in res.output, res.describe()
    assert "FIO-ERR=0" in res.output, res.describe()  # terse field 5: fio's error code
    # What the guest wrote through its virtio driver reached the host's file.
    with open(disk, "rb") as f:
        f.seek(MARK_OFFSET)
        assert f.read(len(MARK)) == MARK
