"""Live migration of guests on vhostd devices between two real QEMUs on one host.

The source QEMU runs on one vhostd device, the destination (the same command
line plus ``-incoming``, its own chardev) on another one: over the same image
file for blk, on a second tap in the same bridge for net.

blk: while QMP ``migrate`` runs, the guest reads 1 MiB regions of its disk
through the page cache, one after the other (the device writes those pages
with DMA, which QEMU sees only through vhostd's dirty log), and writes
random 64 KiB blocks with O_DIRECT, reading each back.  Once the host says
the migration completed, the guest, now on the destination, checks every
region again from its page cache: a page the log missed arrived with the
content it had when QEMU sent it (``test_a_broken_dirty_log_is_detected``
shows that the test sees it).  The host then compares the written area with
the image file.

QEMU 7.2 under TCG re-arms dirty tracking of a page only when the vCPU's TLB
is flushed (the sync does not reset the TLB's dirty bits), so a guest
process that never switches out dirties RAM unseen.  The guests here keep a
pipe busy (``yes | dd``): the two processes switch every 64 KiB, each switch
flushes the TLB, and QEMU sees the guest's own writes soon after they happen.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import guestvm
import vhostd_proc
from netns import NetNs, vhostd_net
from migration import console_rc, destination, qmp_args, wait_migration
from qmp import Qmp, QmpError
from vhostd import control

pytestmark = pytest.mark.guest

MIB = 1 << 20
CHUNK_MB = 16                   # read through the page cache per round
CHUNKS = 12                     # distinct chunks, read in turn
CACHED_CHUNKS = 4               # read between two drops of the page cache
FILL_MB = 280                   # tmpfs zeros: the page cache keeps to the rest of RAM
WRITE_AREA = 192 * MIB          # 64 blocks of 64 KiB written with O_DIRECT
WRITE_BLOCKS = 64
FLAG_OFFSET = 250 * MIB
DISK_SIZE = 256 * MIB
BANDWIDTH = 64 << 20            # bytes/s: the first pass over RAM takes a few seconds
FLAG = b"MIGRATED"
HOLD_SECONDS = 3.0              # of reads into pages QEMU has already sent
GUEST_MB = 512
# Debian's kernel zeroes every page it allocates (init_on_alloc): a page cache
# page would then be written by the CPU, which QEMU tracks itself, just
# before the device fills it, and a missing dirty log would go unseen.
NO_ZEROING = "init_on_alloc=0"


def _flag_is(flag: bytes) -> str:
    return (f'[ "$(dd if=$D bs=512 skip={FLAG_OFFSET // 512} count=1 iflag=direct 2>/dev/null '
            f'| head -c {len(flag)})" = "{flag.decode()}" ]')


def _write_round() -> str:
    wb = WRITE_AREA // (64 * 1024)
    return f"""  w=$((i % {WRITE_BLOCKS}))
  dd if=/dev/urandom of=/tmp/w bs=64k count=1 2>/dev/null
  dd if=/tmp/w of=$D bs=64k seek=$(({wb} + w)) count=1 oflag=direct conv=notrunc 2>/dev/null
  back=$(dd if=$D bs=64k skip=$(({wb} + w)) count=1 iflag=direct 2>/dev/null | md5)
  [ "$back" = "$(md5 < /tmp/w)" ] || {{ echo "BAD WRITE block $w round $i"; exit 1; }}
  i=$((i + 1))"""


def blk_script(expected: Sequence[str]) -> str:
    """Until the host says MIGRATED, two readers read CHUNK_MB chunks through
    the page cache in turn and check each one, while the main loop also
    writes and reads back one 64 KiB block per round with O_DIRECT; then the
    chunks still cached are checked again and the write area's checksum is
    printed.  A chunk whose pages the device filled just before the
    switch-over, after QEMU last sent them, is checked on the destination:
    without the dirty log it is stale there.

    The guest first fills most of its free RAM with a tmpfs file of zeros,
    so that the page cache recycles the same pages (QEMU has sent them)."""
    sets = "\n".join(f"E{i}={md5}" for i, md5 in enumerate(expected))
    wb = WRITE_AREA // (64 * 1024)
    half = len(expected) // 2
    return f"""
D=/dev/vda
{sets}
md5() {{ md5sum | cut -c1-32; }}
check() {{  # chunk, what (a small dd buffer: the pages the page cache recycles are its own)
  got=$(dd if=$D bs=64k skip=$(($1 * {CHUNK_MB * 16})) count={CHUNK_MB * 16} 2>/dev/null | md5)
  [ "$got" = "$(eval echo \\$E$1)" ] || echo "BAD $2 chunk $1"
}}
reader() {{  # first chunk: reads {half} chunks in turn until MIGRATED
  k=0
  until {_flag_is(FLAG)}; do
    [ $((k % {CACHED_CHUNKS})) -eq 0 ] && echo 1 > /proc/sys/vm/drop_caches
    check $(($1 + k % {half})) READ
    k=$((k + 1))
  done
  echo "READER $1 ROUNDS $k"
}}
mkdir -p /fill && mount -t tmpfs -o size={FILL_MB}M fill /fill
dd if=/dev/zero of=/fill/zeros bs=1M count={FILL_MB} 2>/dev/null
echo MIGRATION-LOAD-START
reader 0 &
R=$!
i=0
until {_flag_is(FLAG)}; do
{_write_round()}
  check $(({half} + i % {half})) READ
  [ $i -lt 6000 ] || {{ echo "NO FLAG after $i rounds"; exit 1; }}
done
wait $R
echo "ROUNDS $i"
n=0
while [ $n -lt {len(expected)} ]; do check $n CACHED; n=$((n + 1)); done
echo "WRITE-AREA $(dd if=$D bs=64k skip={wb} count={WRITE_BLOCKS} iflag=direct 2>/dev/null | md5)"
echo MIGRATION-CHECK-DONE
"""


# --- QEMU on both sides ---------------------------------------------------------

def hold_after_first_pass(qmp: Qmp, seconds: float, timeout: float = 120) -> None:
    """Keeps QEMU iterating for `seconds` after its first pass over RAM: the
    device then writes pages QEMU has already sent.  downtime-limit 1 ms and
    a slow stream: the guest dirties more than 2 KiB between two syncs."""
    deadline = time.monotonic() + timeout
    while True:
        st = qmp.command("query-migrate")
        assert st.get("status") in ("setup", "active"), f"switched over before the hold: {st}"
        if st.get("ram", {}).get("dirty-sync-count", 0) >= 2:
            break
        assert time.monotonic() < deadline, "the first pass over RAM did not end"
        time.sleep(0.05)
    qmp.command("migrate-set-parameters", **{"max-bandwidth": 2 << 20})
    time.sleep(seconds)
    st = qmp.command("query-migrate")
    assert st.get("status") == "active", f"switched over during the hold: {st}"


def start_migration(qmp_src: Qmp, dst: guestvm.Guest, qmp_dst_path: Path, mig: Path, *,
                    bandwidth: int = BANDWIDTH, downtime_ms: int = 300) -> None:
    try:
        Qmp(qmp_dst_path).close()   # the destination is up and listening for the stream
    except QmpError:
        raise AssertionError(f"destination QEMU did not start: {dst.result(timeout=5).describe()}") from None
    qmp_src.command("migrate-set-parameters", **{"max-bandwidth": bandwidth, "downtime-limit": downtime_ms})
    qmp_src.command("migrate", uri=f"unix:{mig}")


# --- blk ---------------------------------------------------------------------

@dataclass
class Disk:
    tmp: Path
    image: Path
    expected: list[str]


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    guestvm.require_guest()
    image = tmp_path / "disk.img"
    data = os.urandom(DISK_SIZE)
    image.write_bytes(data)
    step = CHUNK_MB * MIB
    yield Disk(tmp_path, image, [hashlib.md5(data[i * step:(i + 1) * step]).hexdigest()
                                 for i in range(CHUNKS)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_flag(image: Path, flag: bytes) -> None:
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, flag.ljust(512, b"\0"), FLAG_OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_area_md5(image: Path) -> str:
    with open(image, "rb") as f:
        f.seek(WRITE_AREA)
        return hashlib.md5(f.read(WRITE_BLOCKS * 64 * 1024)).hexdigest()


def blk_device(sock: Path, num_queues: int, packed: bool = False) -> list[str]:
    return guestvm.vhost_user_blk_args(sock, num_queues=num_queues, packed=packed)


@dataclass
class Outcome:
    status: dict[str, Any]
    dst: guestvm.GuestResult
    src_log: str
    dst_log: str
    logged_pages_seen: int       # the source's dirty log pages, from `vhostd status` mid-migration


def metric(port: int, name: str, device: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf'^{name}\{{device="{device}"\}} (\S+)$', body, re.M)
    assert m, f"no {name} for {device} in:\n{body}"
    return float(m[1])


def dirty_log_pages(ctl: Path, need_pages: bool, timeout: float = 60) -> int:
    """Waits until the source's status shows logging on (with pages logged)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dev = control.request(ctl, "status")["status"]["devices"][0]
        log = dev.get("dirty_log", {})
        if log.get("enabled") and (log.get("pages", 0) > 0 or not need_pages):
            return int(log["pages"])
        time.sleep(0.1)
    raise AssertionError(f"the dirty log never showed pages: {dev}")


def migrate_blk(disk: Disk, *, aio: str = "io_uring", num_queues: int = 1, packed: bool = False,
                src_env: dict[str, str] | None = None) -> Outcome:
    tmp = disk.tmp
    mig, qmp_src, qmp_dst, ctl = tmp / "mig.sock", tmp / "qmp-src.sock", tmp / "qmp-dst.sock", tmp / "ctl.sock"
    extra = ["--aio", aio, "--num-queues", str(num_queues)]
    port = free_port()
    src_d = vhostd_proc.Vhostd(["blk", "--name", "src", "--socket-path", str(tmp / "src.sock"),
                                "--file", str(disk.image), "--control-socket", str(ctl),
                                "--metrics-listen", f"127.0.0.1:{port}", *extra],
                               tmp / "src.sock", tmp / "src.log", env={**os.environ, **(src_env or {})})
    dst_d = vhostd_proc.blk(tmp, disk.image, *extra, name="dst")
    try:
        src = guestvm.start_guest(blk_script(disk.expected),
                                  [*blk_device(tmp / "src.sock", num_queues, packed), *qmp_args(qmp_src)],
                                  mem_mb=GUEST_MB, timeout=300, append=NO_ZEROING)
        with src:
            assert src.wait_for("MIGRATION-LOAD-START", 120), src.console
            dst = destination(src, blk_device(tmp / "dst.sock", num_queues, packed), qmp_dst, mig, tmp / "dst-qemu")
            with dst, Qmp(qmp_src) as q:
                start_migration(q, dst, qmp_dst, mig, downtime_ms=1)
                hold_after_first_pass(q, HOLD_SECONDS)
                pages = dirty_log_pages(ctl, need_pages=not src_env)
                assert metric(port, "vhostd_dirty_log_enabled", "src") == 1.0
                text = subprocess.run([sys.executable, "-m", "vhostd", "status", "--control", str(ctl)],
                                      capture_output=True, text=True, check=True).stdout
                assert re.search(r"^  dirty log: on, \d+ pages logged", text, re.M), text
                assert (metric(port, "vhostd_dirty_log_pages_total", "src") > 0) is not bool(src_env)
                q.command("migrate-set-parameters", **{"max-bandwidth": BANDWIDTH, "downtime-limit": 300})
                status = wait_migration(q)
                if status.get("status") == "completed":
                    set_flag(disk.image, FLAG)
                    q.command("quit")
                result = dst.result(timeout=240)
        return Outcome(status, result, src_d.log(), dst_d.log(), pages)
    finally:
        src_d.stop()
        dst_d.stop()


def check_blk_success(disk: Disk, out: Outcome) -> None:
    assert out.status.get("status") == "completed", out.status
    assert "MIGRATION-CHECK-DONE" in out.dst.console, out.dst.describe()
    assert console_rc(out.dst.console) == 0 and "BAD" not in out.dst.console, out.dst.describe()
    m = re.search(r"WRITE-AREA ([0-9a-f]{32})", out.dst.console)
    assert m and m.group(1) == write_area_md5(disk.image), out.dst.console
    rounds = re.search(r"ROUNDS (\d+)", out.dst.console)
    assert rounds and int(rounds[1]) > 0, out.dst.console
    assert "dirty page logging on" in out.src_log, out.src_log[-3000:]
    assert out.logged_pages_seen > 0


@pytest.mark.parametrize("aio, num_queues, packed", [("io_uring", 1, False), ("sync", 2, False),
                                                    ("io_uring", 2, True)],
                         ids=["io_uring-1q", "sync-2q", "io_uring-2q-packed"])
def test_guest_on_a_vhostd_disk_migrates_under_read_write_load(disk: Disk, aio: str, num_queues: int,
                                                               packed: bool) -> None:
    out = migrate_blk(disk, aio=aio, num_queues=num_queues, packed=packed)
    check_blk_success(disk, out)
    # The guest's driver (not the firmware's) ran packed rings on both sides.
    layouts = [set(re.findall(r"ring \d+ started \((packed|split),", log)) for log in (out.src_log, out.dst_log)]
    assert all("packed" in found for found in layouts) is packed, layouts
    rounds = re.search(r"ROUNDS (\d+)", out.dst.console)
    print(f"\nmigration {aio}/{num_queues}q{' packed' if packed else ''}: total {out.status.get('total-time')} ms, "
          f"downtime {out.status.get('downtime')} ms, {rounds[1] if rounds else '?'} rounds, "
          f"{out.logged_pages_seen} pages logged when first seen")


def test_a_broken_dirty_log_is_detected(disk: Disk) -> None:
    """The same scenario with a source whose log records nothing (a hook
    compiled only into the tests' build): the guest must see stale pages."""
    out = migrate_blk(disk, src_env={"VHOSTD_TEST_DROP_DIRTY_LOG": "1"})
    assert "the dirty log records nothing" in out.src_log, out.src_log[-3000:]
    assert out.status.get("status") == "completed", out.status
    # Stale pages show in the read that spans the switch-over or in the
    # cached copy checked after it.
    bad = re.findall(r"BAD (?:READ|CACHED) chunk \d+", out.dst.console)
    print(f"\nwith the log broken: {bad or 'nothing stale'} on the destination")
    assert bad, out.dst.describe()


@pytest.mark.parametrize("how", ["cancel", "kill-destination"])
def test_a_failed_migration_leaves_the_guest_running_on_the_source(disk: Disk, how: str) -> None:
    tmp = disk.tmp
    mig, qmp_src, qmp_dst = tmp / "mig.sock", tmp / "qmp-src.sock", tmp / "qmp-dst.sock"
    src_d = vhostd_proc.blk(tmp, disk.image, name="src")
    dst_d = vhostd_proc.blk(tmp, disk.image, name="dst")
    try:
        src = guestvm.start_guest(blk_script(disk.expected), [*blk_device(tmp / "src.sock", 1), *qmp_args(qmp_src)],
                                  mem_mb=GUEST_MB, timeout=300, append=NO_ZEROING)
        with src:
            assert src.wait_for("MIGRATION-LOAD-START", 120), src.console
            dst = destination(src, blk_device(tmp / "dst.sock", 1), qmp_dst, mig, tmp / "dst-qemu")
            with dst, Qmp(qmp_src) as q:
                start_migration(q, dst, qmp_dst, mig, bandwidth=8 << 20)   # slow: it cannot finish first
                time.sleep(2.0)
                if how == "cancel":
                    q.command("migrate_cancel")
                else:
                    dst.kill()
                status = wait_migration(q)
                assert status.get("status") == ("cancelled" if how == "cancel" else "failed"), status
                dst.kill()
                time.sleep(2.0)    # the guest keeps reading and writing on the source
                set_flag(disk.image, FLAG)
                result = src.result(timeout=240)
        assert "MIGRATION-CHECK-DONE" in result.console, result.describe()
        assert result.rc == 0 and "BAD" not in result.output, result.describe()
        m = re.search(r"WRITE-AREA ([0-9a-f]{32})", result.output)
        assert m and m.group(1) == write_area_md5(disk.image), result.output
        log = src_d.log()
        assert "dirty page logging on" in log and "dirty page logging off" in log, log[-3000:]
        assert src_d.alive() and dst_d.alive()
    finally:
        src_d.stop()
        dst_d.stop()


def test_an_idle_guest_migrates_there_and_back_on_the_same_daemons(tmp_path: Path) -> None:
    """A -> B -> A: the first daemon serves a new QEMU after its first one quit."""
    guestvm.require_guest()
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", DISK_SIZE)
    a, b = vhostd_proc.blk(tmp_path, image, name="a"), vhostd_proc.blk(tmp_path, image, name="b")
    script = f"""
D=/dev/vda
echo 'before migration' | dd of=$D bs=512 seek=8 conv=sync,notrunc oflag=direct 2>/dev/null
echo IDLE-START
n=0
until {_flag_is(FLAG)}; do sleep 1; n=$((n + 1)); [ $n -lt 300 ] || exit 1; done
dd if=$D bs=512 skip=8 count=1 iflag=direct 2>/dev/null | head -c 16; echo
echo 'after migration' | dd of=$D bs=512 seek=9 conv=sync,notrunc oflag=direct 2>/dev/null
sync
echo IDLE-DONE
"""
    try:
        src = guestvm.start_guest(script, [*blk_device(tmp_path / "a.sock", 1), *qmp_args(tmp_path / "q0.sock")],
                                  timeout=300)
        with src:
            assert src.wait_for("IDLE-START", 120), src.console
            current, hops = src, []
            for n, sock in enumerate([tmp_path / "b.sock", tmp_path / "a.sock"], start=1):
                mig, qmp_dst = tmp_path / f"mig{n}.sock", tmp_path / f"q{n}.sock"
                dst = destination(current, blk_device(sock, 1), qmp_dst, mig, tmp_path / f"qemu{n}")
                with Qmp(tmp_path / f"q{n - 1}.sock") as q:
                    start_migration(q, dst, qmp_dst, mig, bandwidth=256 << 20)
                    status = wait_migration(q)
                    assert status.get("status") == "completed", status
                    q.command("quit")
                current.result(timeout=30)
                hops.append((status.get("total-time"), status.get("downtime")))
                current = dst
            with current:
                set_flag(image, FLAG)
                result = current.result(timeout=120)
        print(f"\nidle migrations A->B, B->A (total, downtime ms): {hops}")
        assert "IDLE-DONE" in result.console and "before migration" in result.console, result.describe()
        with open(image, "rb") as f:
            f.seek(9 * 512)
            assert f.read(15) == b"after migration"
        assert a.log().count("front-end connected") == 2 and b.log().count("front-end connected") == 1
        assert a.alive() and b.alive()
    finally:
        a.stop()
        b.stop()


# --- net ---------------------------------------------------------------------

HOST_IP, GUEST_IP = "10.99.0.1", "10.99.0.2"
GUEST_MAC = "52:54:00:12:34:56"
PINGS = 250                     # 0.1 s apart: 25 s across boot, migration and after


def net_device(sock: Path, announce: bool) -> list[str]:
    extra = "" if announce else ",guest_announce=off"
    return ["-chardev", f"socket,id=n0,path={sock}", "-netdev", "vhost-user,id=net0,chardev=n0",
            "-device", f"virtio-net-pci,netdev=net0,vectors=0,mac={GUEST_MAC}{extra}"]


def fdb_port(ns: NetNs, mac: str) -> str | None:
    """The bridge port the bridge forwards mac to (its learnt FDB entry)."""
    for line in ns.run(["bridge", "fdb", "show", "br", "br0"]).stdout.splitlines():
        f = line.split()
        if f and f[0] == mac and "dev" in f and "permanent" not in f:
            return f[f.index("dev") + 1]
    return None


@pytest.mark.root
@pytest.mark.parametrize("announce", [True, False], ids=["guest-announce", "send-rarp"])
def test_net_guest_migrates_to_a_tap_in_the_same_bridge(tmp_path: Path, ns: NetNs, announce: bool) -> None:
    """Source on tap A, destination on tap B, both ports of br0 in a netns;
    a ping and an iperf3 stream from the netns to the guest go on across the
    migration, and the guest's announcement moves its MAC to tap B."""
    guestvm.require_guest()
    ns.run(["ip", "link", "add", "br0", "type", "bridge"])
    ns.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", "br0"])
    ns.run(["ip", "link", "set", "br0", "up"])
    src_d = vhostd_net(ns, tmp_path, "vtapA", "--bridge", "br0", name="src")
    dst_d = vhostd_net(ns, tmp_path, "vtapB", "--bridge", "br0", name="dst")
    mig, qmp_src, qmp_dst = tmp_path / "mig.sock", tmp_path / "qmp-src.sock", tmp_path / "qmp-dst.sock"
    script = f"""
ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up
iperf3 -s -D
echo NET-READY
sleep 600
"""
    try:
        src = guestvm.start_guest(script, [*net_device(tmp_path / "src.sock", announce), *qmp_args(qmp_src)],
                                  timeout=300)
        with src:
            assert src.wait_for("NET-READY", 120), src.console
            ping = ns.popen(["ping", "-n", "-i", "0.1", "-c", str(PINGS), "-W", "1", GUEST_IP],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(2)
            assert fdb_port(ns, GUEST_MAC) == "vtapA"
            iperf = ns.popen(["iperf3", "-c", GUEST_IP, "-t", "15", "-f", "m"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(3)
            dst = destination(src, net_device(tmp_path / "dst.sock", announce), qmp_dst, mig,
                              tmp_path / "dst-qemu")
            with dst, Qmp(qmp_src) as q:
                start_migration(q, dst, qmp_dst, mig, bandwidth=256 << 20)
                status = wait_migration(q)
                assert status.get("status") == "completed", status
                q.command("quit")
                src.result(timeout=30)
                iperf_out = iperf.communicate(timeout=60)[0]
                ping_out = ping.communicate(timeout=60)[0]
                assert dst.proc.poll() is None, dst.result().describe()
                port = fdb_port(ns, GUEST_MAC)
        replies = [int(s) for s in re.findall(r"icmp_seq=(\d+)", ping_out)]
        lost = PINGS - len(set(replies))
        print(f"\nnet migration ({'guest announce' if announce else 'SEND_RARP'}): total "
              f"{status.get('total-time')} ms, downtime {status.get('downtime')} ms, "
              f"{lost} of {PINGS} pings lost; iperf3: {iperf_out.strip().splitlines()[-3:]}")
        assert port == "vtapB", f"guest MAC still learnt on {port}"
        assert iperf.returncode == 0 and "receiver" in iperf_out, iperf_out
        assert max(replies) >= PINGS - 5, ping_out          # the ping ended on the destination
        assert lost <= 30, ping_out
        assert "dirty page logging on" in src_d.log()
        rarp = "VHOST_USER_SEND_RARP" in dst_d.log()
        assert rarp is not announce, dst_d.log()[-3000:]
        assert src_d.alive() and dst_d.alive()
    finally:
        src_d.stop()
        dst_d.stop()
