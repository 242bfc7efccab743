"""Guest memory hotplug under I/O with real QEMU guests (QEMU 7.2, TCG).

- 16 pc-dimms (256 MiB memfd, share=on) are hot-added through QMP while the
  guest writes and reads back 1 MiB blocks with O_DIRECT.  New memory is
  onlined movable (memhp_default_state=online_movable), and user pages and
  the page cache prefer ZONE_MOVABLE, so the I/O buffers come from the
  DIMMs.  Then two DIMMs are offlined in the guest and removed with
  device_del.  QEMU sends each change as ADD_MEM_REG / REM_MEM_REG
  (CONFIGURE_MEM_SLOTS): without it QEMU refuses the eighth region.
- A virtio-mem device (memfd, share=on) grows and shrinks several times
  (qom-set requested-size) under the same I/O.  QEMU 7.2 hands a vhost-user
  back-end the whole virtio-mem region once and discards unplugged blocks in
  it; the back-end must carry on.
- The same DIMM hotplug on a NIC, with ping and an iperf3 stream running.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from pathlib import Path

import pytest

import guestvm
import vhostd_proc
from netns import NetNs, vhostd_net
from qmp import Qmp

pytestmark = pytest.mark.guest

MIB = 1 << 20
DISK = 256 * MIB
WRITE_MB = 64                  # blocks of 1 MiB written and read back
CMD_SECTOR = 200 * MIB // 512
ACK_SECTOR = 201 * MIB // 512
FLAG_SECTOR = 250 * MIB // 512
DIMM = 256 * MIB
HOTPLUG = "slots=16,maxmem=8G"
MOVABLE = "memhp_default_state=online_movable"


def _sector_cmd(sector: int) -> str:
    return f"dd if=$D bs=512 skip={sector} count=1 iflag=direct 2>/dev/null | tr -d '\\0'"


def blk_script() -> str:
    """Writes and reads back 1 MiB blocks until the host writes DONE;
    offlines memory blocks when the host asks (the command sector holds
    "OFFLINE tag block..."), acknowledging in another.  User pages prefer
    ZONE_MOVABLE, where hot-added memory goes: the buffers move there as
    soon as DIMMs come (boot memory is not filled first: the DIMMs' struct
    pages come out of it)."""
    return f"""
D=/dev/vda
md5() {{ md5sum | cut -c1-32; }}
echo "BLOCK-SIZE $(cat /sys/devices/system/memory/block_size_bytes)"
echo HOTPLUG-READY
i=0
seen=""
while [ "$({_sector_cmd(FLAG_SECTOR)})" != "DONE" ]; do
  c=$({_sector_cmd(CMD_SECTOR)})
  if [ -n "$c" ] && [ "$c" != "$seen" ]; then
    set -- $c
    tag=$2
    shift 2
    ok=1
    for b in "$@"; do
      t=0
      until echo offline > /sys/devices/system/memory/memory$b/state 2>/dev/null; do
        t=$((t + 1))
        [ $t -lt 30 ] || {{ ok=0; break; }}
        sleep 0.5
      done
    done
    echo "OFFLINED $tag ok=$ok"
    echo "ACK $tag $ok" | dd of=$D bs=512 seek={ACK_SECTOR} conv=sync,notrunc oflag=direct 2>/dev/null
    seen="$c"
  fi
  w=$((i % {WRITE_MB}))
  dd if=/dev/urandom of=/tmp/w bs=1M count=1 2>/dev/null
  dd if=/tmp/w of=$D bs=1M seek=$w count=1 oflag=direct conv=notrunc 2>/dev/null
  back=$(dd if=$D bs=1M skip=$w count=1 iflag=direct 2>/dev/null | md5)
  [ "$back" = "$(md5 < /tmp/w)" ] || {{ echo "BAD WRITE block $w round $i"; exit 1; }}
  # Once more through the page cache, which keeps what it read (in hot-added memory).
  cached=$(dd if=$D bs=1M skip=$w count=1 2>/dev/null | md5)
  [ "$cached" = "$back" ] || {{ echo "BAD CACHED READ block $w round $i"; exit 1; }}
  i=$((i + 1))
  [ $i -lt 5000 ] || {{ echo "NO DONE after $i rounds"; exit 1; }}
done
echo "ROUNDS $i"
grep MemTotal /proc/meminfo
awk '/zone +Movable/ {{m = 1}} m && /pages free/ {{f = $3}} m && /present/ {{print "MOVABLE present " $2 " free " f; exit}}' /proc/zoneinfo
echo "WRITE-AREA $(dd if=$D bs=1M count={WRITE_MB} iflag=direct 2>/dev/null | md5)"
echo HOTPLUG-DONE
"""


def write_sector(image: Path, sector: int, text: str) -> None:
    with open(image, "r+b") as f:
        f.seek(sector * 512)
        f.write(text.encode().ljust(512, b"\0"))
        f.flush()


def read_sector(image: Path, sector: int) -> str:
    with open(image, "rb") as f:
        f.seek(sector * 512)
        return f.read(512).rstrip(b"\0").decode(errors="replace").strip()


def wait_until(what: str, cond: object, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():   # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def add_dimm(q: Qmp, i: int) -> None:
    q.command("object-add", **{"qom-type": "memory-backend-memfd", "id": f"m{i}", "size": DIMM, "share": True})
    q.command("device_add", driver="pc-dimm", id=f"d{i}", memdev=f"m{i}")


def dimms(q: Qmp) -> dict[str, tuple[int, int]]:
    """id -> (guest-physical address, size) of every plugged DIMM."""
    return {d["data"]["id"]: (d["data"]["addr"], d["data"]["size"])
            for d in q.command("query-memory-devices") if d["type"] == "dimm"}


def write_area_md5(image: Path) -> str:
    with open(image, "rb") as f:
        return hashlib.md5(f.read(WRITE_MB * MIB)).hexdigest()


def resident_in_mappings_of(pid: int, size: int) -> int:
    """Bytes resident in the process's mappings of exactly `size` bytes:
    vhostd's view of the hot-added regions (it maps each region whole)."""
    total, current = 0, 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                current = end - start
            elif line.startswith("Rss:") and current == size:
                total += int(line.split()[1]) * 1024
    return total


def check_blk_result(res: guestvm.GuestResult, image: Path) -> None:
    assert res.rc == 0 and "HOTPLUG-DONE" in res.output and "BAD" not in res.output, res.describe()
    m = re.search(r"WRITE-AREA ([0-9a-f]{32})", res.output)
    assert m and m.group(1) == write_area_md5(image), res.output


def test_sixteen_dimms_hot_added_and_two_removed_under_blk_io(tmp_path: Path) -> None:
    guestvm.require_guest()
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", DISK)
    d = vhostd_proc.blk(tmp_path, image, name="hp")
    qmp_path = tmp_path / "qmp.sock"
    try:
        g = guestvm.start_guest(blk_script(), [*guestvm.vhost_user_blk_args(tmp_path / "hp.sock"),
                                               "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                                timeout=420, hotplug=HOTPLUG, append=MOVABLE)
        with g, Qmp(qmp_path) as q:
            assert g.wait_for("HOTPLUG-READY", 120), g.console
            block = int(re.search(r"BLOCK-SIZE ([0-9a-fx]+)", g.console)[1], 16)  # type: ignore[index]
            for i in range(1, 17):
                add_dimm(q, i)
                time.sleep(0.3)          # the guest's I/O goes on meanwhile
            wait_until("18 regions in vhostd", lambda: "hp: memory: 18 regions" in d.log())
            plugged = dimms(q)
            assert len(plugged) == 16
            for tag, dimm in ((1, "d16"), (2, "d15")):
                addr, size = plugged[dimm]
                blocks = " ".join(str(b) for b in range(addr // block, (addr + size) // block))
                write_sector(image, CMD_SECTOR, f"OFFLINE {tag} {blocks}")
                wait_until(f"the guest offlining {dimm}", lambda: read_sector(image, ACK_SECTOR).startswith(f"ACK {tag}"))
                assert read_sector(image, ACK_SECTOR) == f"ACK {tag} 1", g.console[-2000:]
                q.command("device_del", id=dimm)
                wait_until(f"{dimm} unplugged", lambda: dimm not in dimms(q))
                q.command("object-del", id="m" + dimm[1:])
            wait_until("the removals in vhostd", lambda: d.log().count("hp: memory region removed") == 2)
            wait_until("16 regions in vhostd", lambda: "hp: memory: 16 regions" in d.log())
            time.sleep(2)                # more I/O after the removals
            # vhostd moved data in and out of the DIMMs: their pages are in its mappings.
            touched = resident_in_mappings_of(d.proc.pid, DIMM)
            write_sector(image, FLAG_SECTOR, "DONE")
            res = g.result()
        check_blk_result(res, image)
        assert touched >= 1 * MIB, f"vhostd touched {touched} bytes of hot-added memory"
        total = int(re.search(r"MemTotal:\s+(\d+) kB", res.output)[1])  # type: ignore[index]
        assert total > 14 * DIMM // 1024, res.output       # 14 DIMMs still online
        assert "closing connection" not in d.log() and "guest error" not in d.log()
        rounds = re.search(r"ROUNDS (\d+)", res.output)
        print(f"\nDIMM hotplug: {rounds[1] if rounds else '?'} write/read rounds, MemTotal {total // 1024} MiB "
              f"at the end, vhostd touched {touched >> 20} MiB of the DIMMs")
    finally:
        d.stop()


def test_virtio_mem_grows_and_shrinks_under_blk_io(tmp_path: Path) -> None:
    guestvm.require_guest()
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", DISK)
    d = vhostd_proc.blk(tmp_path, image, name="vm")
    qmp_path = tmp_path / "qmp.sock"
    args = [*guestvm.vhost_user_blk_args(tmp_path / "vm.sock"), "-qmp", f"unix:{qmp_path},server=on,wait=off",
            "-object", "memory-backend-memfd,id=vmem0,size=2G,share=on",
            "-device", "virtio-mem-pci,id=vmem,memdev=vmem0,requested-size=0"]
    try:
        g = guestvm.start_guest(blk_script(), args, timeout=420, hotplug="slots=4,maxmem=4G", append=MOVABLE)
        with g, Qmp(qmp_path) as q:
            assert g.wait_for("HOTPLUG-READY", 120), g.console
            sizes = []
            for mib in (512, 1024, 256, 1536, 768):
                q.command("qom-set", path="/machine/peripheral/vmem", property="requested-size", value=mib * MIB)
                deadline = time.monotonic() + 60
                while (got := q.command("qom-get", path="/machine/peripheral/vmem", property="size")) != mib * MIB:
                    if time.monotonic() > deadline:
                        break        # a shrink may stop short if the guest cannot free memory: recorded
                    time.sleep(0.5)
                sizes.append((mib, got // MIB))
            touched = resident_in_mappings_of(d.proc.pid, 2048 * MIB)
            write_sector(image, FLAG_SECTOR, "DONE")
            res = g.result()
        check_blk_result(res, image)
        print(f"\nvirtio-mem requested/plugged MiB: {sizes}; vhostd touched {touched >> 20} MiB of it")
        assert touched >= 1 * MIB, f"vhostd touched {touched} bytes of the virtio-mem region"
        assert all(got == want for want, got in sizes[:2]), sizes          # grows are always met
        assert any(got < prev for (_, prev), (_, got) in zip(sizes, sizes[1:])), sizes   # it shrank
        assert "closing connection" not in d.log() and "guest error" not in d.log()
        # QEMU 7.2 gives the back-end the whole device region once.
        assert re.search(r"vm: memory region added: gpa 0x[0-9a-f]+, 2048 MiB", d.log()), d.log()[-3000:]
    finally:
        d.stop()


HOST_IP, GUEST_IP = "10.99.0.1", "10.99.0.2"


@pytest.mark.root
def test_dimms_hot_added_under_net_traffic(tmp_path: Path, ns: NetNs) -> None:
    guestvm.require_guest()
    v = vhostd_net(ns, tmp_path, "vtap0", name="nhp")
    ns.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", "vtap0"])
    qmp_path = tmp_path / "qmp.sock"
    script = f"""
ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up
iperf3 -s -D
echo NET-READY
sleep 600
"""
    dev = ["-chardev", f"socket,id=n0,path={tmp_path / 'nhp.sock'}", "-netdev", "vhost-user,id=net0,chardev=n0",
           "-device", "virtio-net-pci,netdev=net0,vectors=0", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    try:
        g = guestvm.start_guest(script, dev, timeout=300, hotplug=HOTPLUG, append=MOVABLE)
        with g, Qmp(qmp_path) as q:
            assert g.wait_for("NET-READY", 120), g.console
            ping = ns.popen(["ping", "-n", "-i", "0.1", "-c", "100", "-W", "1", GUEST_IP],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(3)                # the guest's iperf3 server is up by now (TCG is slow)
            iperf = ns.popen(["iperf3", "-c", GUEST_IP, "-t", "10", "-f", "m"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(2)
            for i in range(1, 11):
                add_dimm(q, i)
                time.sleep(0.3)
            wait_until("12 regions in vhostd", lambda: "nhp: memory: 12 regions" in v.log())
            iperf_out = iperf.communicate(timeout=60)[0]
            ping_out = ping.communicate(timeout=60)[0]
        replies = set(re.findall(r"icmp_seq=(\d+)", ping_out))
        print(f"\nDIMM hotplug under net traffic: {100 - len(replies)} of 100 pings lost; "
              f"iperf3: {iperf_out.strip().splitlines()[-3:]}")
        assert iperf.returncode == 0 and "receiver" in iperf_out, iperf_out
        assert len(replies) >= 95, ping_out
        assert "closing connection" not in v.log() and "guest error" not in v.log()
    finally:
        v.stop()
