"""QoS limits seen by a real guest: fio in a QEMU guest (TCG, 2 vCPUs, two
virtio queues, busybox initramfs of tests/guestvm.py with fio in it) against
a `vhostd serve` disk limited to 2000 IOPS and to 20 MiB/s of writes.

Unlimited, this guest does several times both limits on the 2-core test
machine (about 17k IOPS of 4 KiB random reads and 500 MiB/s of 64 KiB
writes), so the rates measured are the limits'.  They are taken twice: from
vhostd's own counters over a 10 s window inside fio's run (read over the
control socket), and fio's own figure over its whole run."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import guestvm
from test_qos_daemon import TOL, Serve, rate, serve  # noqa: F401 (serve: the fixture)

pytestmark = pytest.mark.guest

RUNTIME = 15       # fio's run, seconds
WINDOW = (3, 13)   # the daemon's window inside it, seconds after fio's marker
IOPS = 2000
BW = 20 << 20

FIO = ("fio --name={name} --filename=/dev/vda --rw={rw} --bs={bs} --iodepth={qd} --ioengine=libaio "
       "--direct=1 --numjobs=2 --cpus_allowed=0,1 --cpus_allowed_policy=split --group_reporting "
       f"--time_based --runtime={RUNTIME} --output-format=terse")


def test_guest_fio_against_iops_and_bandwidth_limits(serve: Callable[..., Serve]) -> None:
    """total_iops_sec = 2000 holds 4 KiB random reads at 2000 IOPS and
    write_bytes_sec = 20 MiB/s holds 64 KiB random writes at 20 MiB/s, both
    within 5 % over 10 s, with no I/O error in the guest (requests wait in
    the ring; the guest only sees its disk being slow)."""
    guestvm.require_guest()
    s = serve({"d": f"num_queues = 2\n[devices.d.limits]\ntotal_iops_sec = {IOPS}\nwrite_bytes_sec = {BW}"})
    # fio's terse v3: field 5 error, 8 read IOPS, 48 write KiB/s.
    script = f"""
set -e
echo PHASE-IOPS
{FIO.format(name="r", rw="randread", bs=4096, qd=32)} > /tmp/r.out
echo FIO-READ $(cut -d';' -f5,8 /tmp/r.out)
echo PHASE-BW
{FIO.format(name="w", rw="randwrite", bs=65536, qd=16)} > /tmp/w.out
echo FIO-WRITE $(cut -d';' -f5,48 /tmp/w.out)
"""
    qemu = guestvm.vhost_user_blk_args(s.sock("d"), num_queues=2)

    def requests() -> int:
        return sum(r["requests"] for r in s.device("d")["rings"])

    def written() -> int:
        return sum(r["bytes_read"] for r in s.device("d")["rings"])   # read from the guest: its writes

    with guestvm.start_guest(script, qemu, smp=2, timeout=300) as g:
        assert g.wait_for("PHASE-IOPS", 180), g.console
        t = time.monotonic()
        iops = rate(requests, t + WINDOW[0], t + WINDOW[1])
        assert g.wait_for("PHASE-BW", 60), g.console
        t = time.monotonic()
        bw = rate(written, t + WINDOW[0], t + WINDOW[1])
        res = g.result(timeout=120)
    assert res.rc == 0, res.describe()
    m_r = re.search(r"FIO-READ (\d+);(\d+)", res.output)
    m_w = re.search(r"FIO-WRITE (\d+);(\d+)", res.output)
    assert m_r and m_w, res.describe()
    fio_iops, fio_bw = int(m_r.group(2)), int(m_w.group(2)) * 1024
    q = s.device("d")["qos"]
    print(f"\nguest fio: {IOPS} IOPS limit: {iops:.0f} IOPS (vhostd, 10 s), fio {fio_iops} over {RUNTIME} s; "
          f"{BW >> 20} MiB/s limit: {bw / 2**20:.2f} MiB/s (vhostd, 10 s), fio {fio_bw / 2**20:.2f}; "
          f"throttled {q['throttled_seconds']:.1f} s")
    assert m_r.group(1) == "0" and m_w.group(1) == "0", res.output    # fio's error fields
    assert iops == pytest.approx(IOPS, rel=TOL)
    assert bw == pytest.approx(BW, rel=TOL)
    assert fio_iops == pytest.approx(IOPS, rel=TOL)
    assert fio_bw == pytest.approx(BW, rel=TOL)
    assert q["throttled_seconds"] > 20     # both phases mostly waited on the limits
