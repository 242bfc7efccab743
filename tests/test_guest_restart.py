"""vhostd restarted under a running guest: kill -9 three times while the
guest runs fio with crc32c verification; the guest keeps its disk, fio
finishes with no error.  Server mode (QEMU reconnects, chardev
reconnect=1) and client mode (QEMU listens, vhostd --client reconnects).
Requests in flight at each kill are resubmitted from the inflight buffer."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

import guestvm
import vhostd_proc

pytestmark = pytest.mark.guest

FIO = ("fio --name=restart --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=16 "
       "--ioengine=libaio --direct=1 --size=32M --time_based --runtime=25 "
       "--verify=crc32c --verify_backlog=256 --verify_fatal=1 --output-format=terse")
SCRIPT = f"echo FIO-RUNNING\n{FIO} > /tmp/fio.out; echo FIO-RC $?\n" \
         "echo FIO-ERR $(grep -v '^fio:' /tmp/fio.out | cut -d';' -f5)"
KILLS = 3


def _wait(predicate, timeout: float) -> float | None:   # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("mode", ["server", "client"])
def test_kill_9_and_restart_under_fio_verify(tmp_path: Path, mode: str) -> None:
    guestvm.require_guest()
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", 64 << 20)
    sock = tmp_path / "blk.sock"
    log = tmp_path / "blk.log"
    client = mode == "client"
    args = ["blk", "--socket-path", str(sock), "--file", str(image), *(["--client"] if client else [])]

    def start() -> vhostd_proc.Vhostd:
        return vhostd_proc.Vhostd(args, None if client else sock, log)

    if client:
        chardev = f"socket,id=c0,path={sock},server=on,wait=off"
    else:
        v = start()
        chardev = f"socket,id=c0,path={sock},reconnect=1"
    qemu = ["-chardev", chardev, "-device", "vhost-user-blk-pci,chardev=c0"]
    pauses: list[float] = []
    with guestvm.start_guest(SCRIPT, qemu, timeout=240) as g:
        if client:
            assert _wait(sock.exists, 30) is not None, "QEMU did not create its socket"
            v = start()
        assert g.wait_for("FIO-RUNNING", 90), g.console
        for i in range(KILLS):
            time.sleep(3)
            started = v.log().count("ring 0 started")
            v.stop(signal.SIGKILL)
            t_kill = time.monotonic()
            v = start()
            # The I/O pause: from the kill until the new vhostd runs the ring again.
            assert _wait(lambda: v.log().count("ring 0 started") > started, 30) is not None, v.log()
            pauses.append(time.monotonic() - t_kill)
        res = g.result()
    v.stop()
    assert res.rc == 0, res.describe()
    assert "FIO-RC 0" in res.output and "FIO-ERR 0" in res.output, res.describe()
    assert "inflight buffer restored" in v.log()
    resubmitted = sum(int(n) for n in re.findall(r"resubmitting (\d+)", v.log()))
    print(f"\n{mode}: I/O pause per restart {', '.join(f'{p:.2f}' for p in pauses)} s; "
          f"requests resubmitted {resubmitted}")
