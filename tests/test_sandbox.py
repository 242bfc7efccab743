"""The in-process sandbox ([daemon] sandbox = true, --sandbox): ring workers
under a seccomp allow-list and without capabilities, the control plane
with only the capabilities its devices need.

A syscall outside the allow-list, made by a ring worker, kills the whole
process with SIGSYS (SECCOMP_RET_KILL_PROCESS); normal I/O, reconnect,
reload and real guests (fio with verification, ping) work with it on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import guestvm
import vhostd_proc
from netns import NetNs
from unavailable import missing
from vhostd.frontend import BlkDriver, DriverRing, Frontend, GuestRam
from vhostd.protocol.constants import ProtocolFeature, bit
from vhostd._native import lib

VHOSTD = [sys.executable, "-m", "vhostd"]
PROTO = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
SYS_SCHED_YIELD, SYS_SOCKET, SYS_OPENAT = 24, 41, 257
CAP_NET_ADMIN = 12

# Runs in a child process: one sandboxed worker serves a blk ring (I/O through
# it must work), then makes syscall NR through the test hook.
_CHILD = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from vhostd import sandbox
    from vhostd._native import ffi, lib
    from vhostd.frontend import BlkDriver
    from vhostd.native import EXCLUSIVE_WORKER, NativeScheduler
    from vhd_helpers import Rig
    sandbox.enable_workers()
    rig = Rig(Path(tempfile.mkdtemp()))
    sched = NativeScheduler(1)
    task = sched.attach(rig.vring, {worker}, rig.blk.kind, rig.blk.ptr, rig.ring.kick_fd)
    drv = BlkDriver(rig.ring)
    assert drv.write(3, b"w" * 512).status == 0
    assert drv.read(3, 512).data == b"w" * 512
    print("IO-OK", flush=True)
    nr = ffi.new("long *", int(sys.argv[1]))
    lib.vhd_task_call(task.ptr, ffi.addressof(lib, "vhd_sandbox_test_syscall"), nr)
    print("RESULT", nr[0], flush=True)
""")


def _child(nr: int, worker: str) -> subprocess.CompletedProcess[str]:
    code = _CHILD.format(tests=str(Path(__file__).parent), worker=worker)
    return subprocess.run([sys.executable, "-c", code, str(nr)], capture_output=True, text=True,
                          timeout=60)


def _require_hooks() -> None:
    from vhostd._native import ffi
    nr = ffi.new("long *", SYS_SCHED_YIELD)
    lib.vhd_sandbox_test_syscall(ffi.NULL, nr)
    if nr[0] != 0:
        pytest.fail("this build has no test hooks (VHOSTD_TEST_HOOKS=1, as ./dev builds)")


@pytest.mark.parametrize("worker", ["0", "EXCLUSIVE_WORKER"], ids=["shared", "exclusive"])
def test_a_worker_syscall_outside_the_allow_list_kills_the_process(worker: str) -> None:
    _require_hooks()
    allowed = _child(SYS_SCHED_YIELD, worker)
    assert allowed.returncode == 0, allowed.stderr
    assert "IO-OK" in allowed.stdout and "RESULT 0" in allowed.stdout
    for nr in (SYS_SOCKET, SYS_OPENAT):
        res = _child(nr, worker)
        assert "IO-OK" in res.stdout, res.stderr        # I/O ran under the filter
        assert "RESULT" not in res.stdout               # the syscall never returned
        assert res.returncode == -signal.SIGSYS, (res.returncode, res.stderr)


def _thread_status(pid: int) -> dict[str, dict[str, str]]:
    """comm -> the Seccomp and CapEff lines of each thread of pid (last one wins)."""
    out: dict[str, dict[str, str]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            lines = Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
        except FileNotFoundError:
            continue
        fields = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
        out[comm if tid != str(pid) else "main"] = {k: fields[k].strip() for k in ("Seccomp", "CapEff")}
    return out


def _attach(sock: Path) -> tuple[Frontend, BlkDriver]:
    fe = Frontend(str(sock))
    fe.negotiate(~0, PROTO)
    ram = GuestRam([2 << 20])
    fe.set_mem_table(ram)
    ring = DriverRing(ram, 0, 32)
    fe.start_ring(ring)
    return fe, BlkDriver(ring)


def _status(control: Path) -> dict:  # type: ignore[type-arg]
    out = subprocess.run([*VHOSTD, "status", "--json", "--control", str(control)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def _wait(cond: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sandboxed_daemon_serves_reconnects_and_reloads(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        missing("capabilities are only dropped from root (CI runs as root)")
    for name in ("a", "b", "c"):
        vhostd_proc.sparse_image(tmp_path / f"{name}.img", 1 << 20)
    cfg = tmp_path / "vhostd.toml"
    control = tmp_path / "control.sock"

    def device(name: str, extra: str = "") -> str:
        return (f'[devices.{name}]\ntype = "blk"\nsocket = "{tmp_path}/{name}.sock"\n'
                f'file = "{tmp_path}/{name}.img"\n{extra}\n')

    base = f'[daemon]\ncontrol_socket = "{control}"\nsandbox = true\nworkers = 1\n\n'
    cfg.write_text(base + device("a") + device("b", 'aio = "sync"'))
    with vhostd_proc.Vhostd(["serve", "--config", str(cfg)], control, tmp_path / "log") as v:
        _wait(lambda: "sandbox on" in v.log(), 10)
        for round_ in range(2):                      # the second round: reconnected front-ends
            for name in ("a", "b"):
                fe, drv = _attach(tmp_path / f"{name}.sock")
                data = bytes([round_ + 1]) * 4096
                assert drv.write(8, data).status == 0
                assert drv.flush().status == 0
                assert drv.read(8, 4096).data == data
                threads = _thread_status(v.proc.pid)
                fe.close()
        # Every ring worker is filtered (Seccomp 2) and holds no capability;
        # the main thread is not filtered and keeps none (blk needs none).
        workers = {k: s for k, s in threads.items() if k.startswith("vhostd-")}
        assert "vhostd-worker" in workers and "vhostd-ring" in workers, threads
        assert all(s["Seccomp"] == "2" and int(s["CapEff"], 16) == 0 for s in workers.values()), threads
        assert threads["main"]["Seccomp"] == "0" and int(threads["main"]["CapEff"], 16) == 0, threads
        st = _status(control)
        assert st["sandbox"]["capabilities"] == [], st["sandbox"]
        # Reload: a new image and socket are opened by the control plane.
        cfg.write_text(base + device("a") + device("b", 'aio = "sync"') + device("c")
                       + '[devices.n]\ntype = "net"\nsocket = "' + f'{tmp_path}/n.sock"\ntap = "vtsbx0"\n')
        rep = subprocess.run([*VHOSTD, "reload", "--control", str(control)], capture_output=True, text=True)
        assert rep.returncode == 0, rep.stdout + rep.stderr
        assert "c: started" in rep.stdout
        # A tap needs CAP_NET_ADMIN, which no device needed at start: refused, saying why.
        assert "n: cannot start: needs CAP_NET_ADMIN, which the sandbox dropped at start" in rep.stdout
        fe, drv = _attach(tmp_path / "c.sock")
        assert drv.write(1, b"c" * 512).status == 0 and drv.read(1, 512).data == b"c" * 512
        fe.close()
        assert v.alive()
    assert v.proc.returncode == 0, v.log()
    assert "Traceback" not in v.log()


def test_sandboxed_guest_fio_verify_and_ping(tmp_path: Path, ns: NetNs) -> None:
    """Real guests: blk (io_uring) with fio crc32c verification across a QEMU
    restart (reconnect), and net on a tap with ping, both --sandbox.  The
    net daemon keeps CAP_NET_ADMIN (and nothing else)."""
    guestvm.require_guest()
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", 64 << 20)
    blk = vhostd_proc.blk(tmp_path, image, "--num-queues", "2", "--sandbox")
    net_sock = tmp_path / "net.sock"
    net = vhostd_proc.Vhostd(["net", "--socket-path", str(net_sock), "--tap", "vtsbx1", "--sandbox"],
                             net_sock, tmp_path / "net.log", prefix=ns.cmd([]))
    try:
        ns.run(["ip", "addr", "add", "10.98.0.1/24", "dev", "vtsbx1"])
        qemu = (guestvm.vhost_user_blk_args(blk.listening_socket, num_queues=2)
                + ["-chardev", f"socket,id=n0,path={net_sock}",
                   "-netdev", "vhost-user,id=net0,chardev=n0",
                   "-device", "virtio-net-pci,netdev=net0,vectors=0"])
        fio = ("fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio "
               "--direct=1 --size=16M --verify=crc32c --verify_fatal=1 --output-format=terse > /tmp/f; "
               "echo FIO-ERR $(grep -v '^fio:' /tmp/f | cut -d';' -f5)")
        script = (f"{fio}\nip addr add 10.98.0.2/24 dev eth0 && ip link set eth0 up\n"
                  "ping -c 3 -W 5 10.98.0.1 | grep -q ' 0% packet loss' && echo PING-OK\n")
        for _ in range(2):                           # the second guest reconnects to the same daemons
            res = guestvm.run_guest(script, qemu, timeout=240)
            assert res.rc == 0 and "FIO-ERR 0" in res.output and "PING-OK" in res.output, res.describe()
        assert blk.alive() and net.alive(), blk.log() + net.log()
        for v in (blk, net):
            assert "sandbox on" in v.log()
        main = _thread_status(net.proc.pid)["main"]
        assert int(main["CapEff"], 16) == 1 << CAP_NET_ADMIN, main
        workers = [s for k, s in _thread_status(blk.proc.pid).items() if k.startswith("vhostd-")]
        assert workers and all(s["Seccomp"] == "2" for s in workers)
    finally:
        for v in (blk, net):
            rc = v.stop()
            assert rc == 0, v.log()
