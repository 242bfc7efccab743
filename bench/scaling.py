"""scaling: N devices in ONE `vhostd serve` process on 2 cores, against the 1-device figure.

Four kinds of runs (`--kinds`, default all), each with a fresh daemon per N and round:

blk: N devices on tmpfs images (random data, /dev/shm); N blkfe front-ends (bench/blkfe.c,
--sync) attach; K = N of them (or `--max-active`) then run 4k randread at QD 32 on one queue
each, at the same time.  Result: aggregate IOPS, the daemon's CPU seconds per million
requests over the window, the per-device IOPS spread (max/min), and, from the same round,
`iops_vs_1` (aggregate / the 1-device figure) and `cpu_vs_1` (CPU per request / the 1-device
one).
net: N devices with the null back-end; one dpdk-testpmd with N virtio_user ports (ring 256)
attaches to all of them and sends 60-byte frames on all N in txonly mode.  Result: aggregate
Mpps, CPU seconds per million frames, `mpps_vs_1` (same round).  One testpmd with N ports
is one "guest" whose 512 MiB of 4 KiB-page memory every device maps again, and it slows
down with more ports itself: see net-tsofe.
net-tsofe: the same devices, each driven by its own bench/tsofe.c (`--frame 60 --ring 256`,
interrupt-driven like a guest driver, its own small guest RAM), all N on CPU 1; frames
counted by vhostd's per-ring counters (control socket).
idle: `--idle-devices` (256) devices configured, half blk (2 queues, sparse images) and half
null net: start-up time (spawn to every socket listening; a daemon with no device gives the
fixed part), idle CPU, RSS and its anonymous part per device (against the daemon with no
device), threads, `vhostd status` latency; then every device gets a Python front-end
(tests/scale_load.py: blk 2 queues, net 1 pair, a few verified requests each) and stays
connected and idle: CPU, RSS, threads and status latency again.
qsd: the anchor.  `--anchor-exports` (16) images served by qemu-storage-daemon with every
export on one shared iothread (`qsd-shared`), with one iothread each (`qsd-each`), and by
vhostd (`vhostd`, the blk row of the same N and round, or run here); blkfe as for blk.
Result: aggregate IOPS and CPU per request, and vhostd's same-round ratios to both.

Memory at four points for blk and net (as before): idle (N devices listening), attached (N
front-ends connected, rings started, no I/O), loaded (after the I/O, still attached) and
detached (all front-ends gone).  Memory per device is the least-squares slope over N.
RssAnon is the daemon's own memory; RssShmem is guest RAM (the front-ends' memfds) it
touched through its mappings, counted once per device mapping it.

Placement (2 cores): the daemon (all its threads; its default is one worker per CPU of its
affinity mask, so one worker) or qemu-storage-daemon on CPU 0, every front-end on CPU 1, as
in blk-backend and net-tx.  `cpu0_busy_pct` / `cpu1_busy_pct` (from /proc/stat, all
processes) say which side saturated: ~100% on CPU 0 with the daemon near 100% means the
back-end set the pace; ~100% on CPU 1 the front-ends did (testpmd busy-polls: CPU 1 is
always 100% for net).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import REPO, Benchmark, BenchError, Process, Row, cpu_seconds, progress, unix_listening
from bench import _net as net
from bench import blk_backend
from bench.blk_backend import Frontend, Workload
from bench.tso import TsoFrontend, build_tsofe
from vhostd import control

KINDS = ("blk", "net", "net-tsofe", "idle", "qsd")
NET_KINDS = ("net", "net-tsofe")
SETTLE_S = 1.0   # after a change (devices started, front-ends attached or gone), before reading
NET_QUEUE_SIZE = 256


@dataclass(frozen=True)
class SmallRamWorkload(Workload):
    """blkfe with a small guest RAM: N idle front-ends must not fill the machine's memory."""

    ram_mib: int = 4

    def blkfe_args(self) -> list[str]:
        return [*super().blkfe_args(), "--ram-mib", str(self.ram_mib)]


RANDREAD = SmallRamWorkload("randread-4k-qd32", "randread", 4096, 32)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", default="1,4,16,64", help="values of N for blk and net (default 1,4,16,64)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"from {', '.join(KINDS)} (default all)")
    p.add_argument("--max-active", type=int, default=0,
                   help="blk: front-ends running I/O at once, K = min(N, this); 0 (default): all N")
    p.add_argument("--idle-devices", type=int, default=256, help="idle: devices configured (default 256)")
    p.add_argument("--idle-seconds", type=float, default=3.0,
                   help="idle: window over which idle CPU is measured (default 3)")
    p.add_argument("--anchor-exports", type=int, default=16,
                   help="qsd: exports (and vhostd devices) in the anchor runs (default 16)")
    p.add_argument("--qsd-aio", default="threads", choices=("threads", "io_uring", "native"),
                   help="qsd: aio= of its file blockdevs (default threads, qsd's own default)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured I/O window (default 5)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds; each runs every N once, a fresh daemon each time (default 2)")
    p.add_argument("--image-mib", type=int, default=16, help="blk image size (default 16)")
    p.add_argument("--tmpfs-dir", type=Path, default=Path("/dev/shm"))
    p.add_argument("--workdir", type=Path, default=None,
                   help="config, sockets and logs (default: a temporary directory, removed)")


def unavailable() -> str | None:
    for tool in ("cc", "taskset", net.TESTPMD, "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if (os.cpu_count() or 1) < 2:
        return "needs 2 CPUs (daemon on CPU 0, front-ends on CPU 1)"
    return None


# --- measurements of the daemon and the machine ---------------------------------------------


def memory(pid: int) -> dict[str, float]:
    """RSS and its parts (MiB), threads and open fds of a process."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
                fields[key] = int(value.split()[0])
    return {"rss_mib": fields["VmRSS"] / 1024, "anon_mib": fields["RssAnon"] / 1024,
            "file_mib": fields["RssFile"] / 1024, "shmem_mib": fields["RssShmem"] / 1024,
            "threads": fields["Threads"], "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def cpu_times() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies of each CPU from /proc/stat."""
    out: dict[str, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if re.fullmatch(r"cpu\d+", name):
                v = [int(x) for x in vals[:8]]   # user nice system idle iowait irq softirq steal
                out[name] = (sum(v) - v[3] - v[4], sum(v))
    return out


def busy_pct(t0: dict[str, tuple[int, int]], t1: dict[str, tuple[int, int]], cpu: int) -> float | None:
    name = f"cpu{cpu}"
    if name not in t0 or name not in t1 or t1[name][1] == t0[name][1]:
        return None
    return 100 * (t1[name][0] - t0[name][0]) / (t1[name][1] - t0[name][1])


def context_switches(pid: int) -> int:
    """Context switches of the process's living threads: about one per worker wake-up."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                total += sum(int(line.split()[1]) for line in f
                             if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")))
        except (FileNotFoundError, ProcessLookupError):
            pass   # the thread exited meanwhile
    return total


@dataclass
class Window:
    """The daemon's and the machine's CPU over a measured window."""

    t: float
    daemon_cpu: float
    cpus: dict[str, tuple[int, int]]
    switches: int
    waited: float      # seconds the daemon's threads were runnable but not running

    @staticmethod
    def now(pid: int) -> Window:
        return Window(time.monotonic(), cpu_seconds(pid), cpu_times(), context_switches(pid),
                      net.run_delay(pid))


def window_fields(w0: Window, w1: Window, ops: int) -> Row:
    secs, cpu = w1.t - w0.t, w1.daemon_cpu - w0.daemon_cpu
    return {
        "kops": ops / secs / 1e3,
        "daemon_cpu_pct": 100 * cpu / secs,
        "cpu_s_per_mop": cpu / (ops / 1e6) if ops else None,
        # Why CPU per op grows with more active rings: each ring's worker sleeps and wakes alone.
        "switches_per_kop": 1000 * (w1.switches - w0.switches) / ops if ops else None,
        # Other load on the back-end's CPU (this machine is shared): time its threads waited.
        "daemon_wait_pct": 100 * (w1.waited - w0.waited) / secs,
        "cpu0_busy_pct": busy_pct(w0.cpus, w1.cpus, net.BACKEND_CPU),
        "cpu1_busy_pct": busy_pct(w0.cpus, w1.cpus, net.FRONTEND_CPU),
        "window_s": secs,
    }


# --- the daemon --------------------------------------------------------------------------------


def device_config(kind: str, i: int, workdir: Path, images: list[Path], queues: int = 1) -> str:
    sock = workdir / f"{kind}{i}.sock"
    if kind == "blk":
        return (f'[devices.blk{i}]\ntype = "blk"\nsocket = "{sock}"\nfile = "{images[i]}"\n'
                f"num_queues = {queues}\n")
    # The MAC the tests' front-end (scale_load) expects in the null back-end's RX frames.
    mac = ":".join(f"{b:02x}" for b in (0x52, 0x54, 0x00, 0x5C, i >> 8 & 0xFF, i & 0xFF))
    return f'[devices.net{i}]\ntype = "net"\nsocket = "{sock}"\nbackend = "null"\nmac = "{mac}"\n'


def start_serve(devices: str, socks: list[Path], workdir: Path, tag: str) -> tuple[Process, float]:
    """`vhostd serve` with these devices on CPU 0; returns it and its start-up time (spawn to
    the control socket, which opens once every device listens)."""
    cfg = workdir / f"{tag}.toml"
    control_sock = workdir / f"{tag}.control.sock"
    cfg.write_text(f'[daemon]\ncontrol_socket = "{control_sock}"\n' + devices)
    for s in [*socks, control_sock]:
        s.unlink(missing_ok=True)
    argv = net.pinned(net.BACKEND_CPU, [sys.executable, "-m", "vhostd", "serve", "--config", str(cfg)])
    t0 = time.monotonic()
    proc = Process(argv, workdir / f"{tag}.log")
    deadline = t0 + 30
    while not control_sock.exists():
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            log = proc.log()
            proc.stop()
            raise BenchError(f"vhostd serve did not start its {len(socks)} devices:\n{log}")
        time.sleep(0.002)
    startup = time.monotonic() - t0
    if not all(unix_listening(s) for s in socks):
        proc.stop()
        raise BenchError(f"vhostd serve: not every socket listens:\n{proc.log()}")
    return proc, startup


def control_path(workdir: Path, tag: str) -> Path:
    return workdir / f"{tag}.control.sock"


def start_daemon(kind: str, n: int, workdir: Path, images: list[Path], tag: str) -> tuple[Process, list[Path]]:
    """`vhostd serve` with n devices of one kind on CPU 0, once every socket listens."""
    socks = [workdir / f"{kind}{i}.sock" for i in range(n)]
    proc, _ = start_serve("".join(device_config(kind, i, workdir, images) for i in range(n)), socks,
                          workdir, tag)
    return proc, socks


def snapshot(proc: Process, label: str, row: Row) -> None:
    """Memory at one point, as columns `<label>_<what>`; waits for the daemon to settle."""
    time.sleep(SETTLE_S)
    if proc.proc.poll() is not None:
        raise BenchError(f"vhostd serve exited with {proc.proc.returncode}:\n{proc.log()}")
    for key, value in memory(proc.pid).items():
        row[f"{label}_{key}"] = value


def thread_names(pid: int) -> dict[str, int]:
    """The process's threads by kind: vhostd's ring workers, the kernel's io_uring workers,
    trio's cached threads and the rest (the main thread)."""
    out = {"workers": 0, "io_wq": 0, "trio": 0, "other": 0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        key = ("workers" if name in ("vhostd-worker", "vhostd-ring") else "io_wq" if name.startswith("iou-wrk")
               else "trio" if name.startswith("Trio thread") else "other")
        out[key] += 1
    return out


def status_ms(path: Path, count: int = 10) -> list[float]:
    out = []
    for _ in range(count):
        t = time.monotonic()
        control.request(path, "status")
        out.append(1000 * (time.monotonic() - t))
    return out


def idle_cpu(pid: int, seconds: float) -> float:
    c0 = cpu_seconds(pid)
    time.sleep(seconds)
    return cpu_seconds(pid) - c0


# --- blk ----------------------------------------------------------------------------------------


def make_images(n: int, mib: int, tmpfs: Path) -> tuple[Path, list[Path]]:
    d = Path(tempfile.mkdtemp(prefix="vhostd-scaling-", dir=tmpfs))
    images = [d / f"disk{i}.img" for i in range(n)]
    progress(f"scaling: writing {n} images of {mib} MiB in {tmpfs}")
    for image in images:
        blk_backend.make_image(image, mib)
    return d, images


def run_blk_io(active: list[Frontend], pid: int) -> Row:
    """Starts the active front-ends together; their requests over the back-end's CPU."""
    w0 = Window.now(pid)
    for fe in active:
        fe.go()
    results = [fe.result() for fe in active]
    w1 = Window.now(pid)
    requests = sum(int(r["requests"]) for r in results)
    row = window_fields(w0, w1, requests)
    per_device = [float(r["iops"]) for r in results]
    row["iops"] = sum(per_device)
    row["iops_spread"] = max(per_device) / min(per_device) if min(per_device) > 0 else None
    row["p99_us_max"] = max(float(r["p99_us"]) for r in results)
    row["fe_results"] = results
    return row


def active_count(n: int, args: argparse.Namespace) -> int:
    return min(n, args.max_active) if args.max_active > 0 else n


def drive_blk(proc: Process, socks: list[Path], exe: Path, k: int, workdir: Path, tag: str,
              args: argparse.Namespace, rnd: int, row: Row, memory_points: bool = True) -> None:
    """N blkfe attach to the N sockets; K of them run the workload at once."""
    fes: list[Frontend] = []
    try:
        for i, sock in enumerate(socks):
            fes.append(Frontend(exe, sock, RANDREAD, args.seconds, str(net.FRONTEND_CPU),
                                rnd * 1000 + i, workdir / f"{tag}-fe{i}.log"))
        for fe in fes:
            fe.wait_ready()
        if memory_points:
            snapshot(proc, "attached", row)
        else:
            time.sleep(SETTLE_S)
        row |= run_blk_io(fes[:k], proc.pid)
        if memory_points:
            snapshot(proc, "loaded", row)
        for fe in fes:
            fe.close()   # the idle ones exit 2: stdin closed before their go line
        fes = []
        if memory_points:
            snapshot(proc, "detached", row)
    finally:
        for fe in fes:
            fe.close()


def run_blk(n: int, exe: Path, images: list[Path], workdir: Path, args: argparse.Namespace,
            rnd: int) -> Row:
    tag = f"blk-n{n}-r{rnd}"
    k = active_count(n, args)
    proc, socks = start_daemon("blk", n, workdir, images, tag)
    row: Row = {"kind": "blk", "n": n, "k": k, "round": rnd}
    try:
        snapshot(proc, "idle", row)
        drive_blk(proc, socks, exe, k, workdir, tag, args, rnd, row)
        row["workers"] = thread_names(proc.pid)["workers"]
    except BenchError as e:
        raise BenchError(f"{tag}: {e}\n--- vhostd log ---\n{proc.log()}") from None
    finally:
        proc.stop()
    return row


# --- the qemu-storage-daemon anchor ---------------------------------------------------------------


QSD_MODES = ("qsd-shared", "qsd-each")


def qsd_argv(images: list[Path], socks: list[Path], shared: bool, aio: str) -> list[str]:
    """N vhost-user-blk exports on one iothread each, or all on one shared iothread."""
    argv = ["qemu-storage-daemon"]
    for t in range(1 if shared else len(socks)):
        argv += ["--object", f"iothread,id=io{t}"]
    for i, (image, sock) in enumerate(zip(images, socks)):
        argv += ["--blockdev", f"driver=file,node-name=f{i},filename={image},aio={aio}",
                 "--export", f"type=vhost-user-blk,id=e{i},node-name=f{i},addr.type=unix,"
                             f"addr.path={sock},writable=on,num-queues=1,iothread=io{0 if shared else i}"]
    return argv


def run_qsd(mode: str, n: int, exe: Path, images: list[Path], workdir: Path, args: argparse.Namespace,
            rnd: int) -> Row:
    tag = f"{mode}-n{n}-r{rnd}"
    socks = [workdir / f"{tag}-{i}.sock" for i in range(n)]
    for sock in socks:
        sock.unlink(missing_ok=True)
    argv = net.pinned(net.BACKEND_CPU, qsd_argv(images[:n], socks, mode == "qsd-shared", args.qsd_aio))
    row: Row = {"kind": "qsd", "backend": mode, "n": n, "k": n, "round": rnd}
    with Process(argv, workdir / f"{tag}.log", socket=socks[-1]) as proc:
        try:
            if not all(unix_listening(s) for s in socks):
                raise BenchError("not every export listens")
            drive_blk(proc, socks, exe, n, workdir, tag, args, rnd, row, memory_points=False)
            row["threads"] = len(os.listdir(f"/proc/{proc.pid}/task"))
        except BenchError as e:
            raise BenchError(f"{tag}: {e}\n--- qemu-storage-daemon log ---\n{proc.log()}") from None
    return row


# --- net ----------------------------------------------------------------------------------------


def port_totals(pmd: net.TestPmd) -> int:
    """TX-packets summed over every port (`show port stats all`)."""
    out = pmd.command("show port stats all")
    return sum(int(m) for m in re.findall(r"TX-packets:\s+(\d+)", out))


def net_frontend(socks: list[Path], log_path: Path) -> net.TestPmd:
    vdevs = [f"net_virtio_user{i},path={s},queue_size={NET_QUEUE_SIZE}" for i, s in enumerate(socks)]
    return net.TestPmd(net.FRONTEND_CPU, vdevs,
                       ["--forward-mode=txonly", f"--txpkts={net.carried(64)}",
                        f"--rxd={NET_QUEUE_SIZE}", f"--txd={NET_QUEUE_SIZE}"], log_path)


def tx_frames(ctl: Path) -> int:
    """Frames vhostd took from every TX ring (ring 1 of each device), from its counters."""
    st = control.request(ctl, "status")["status"]
    return sum(r["requests"] for d in st["devices"] for r in d.get("rings", []) if r["index"] == 1)


def run_net_tsofe(n: int, workdir: Path, args: argparse.Namespace, rnd: int, tsofe: Path) -> Row:
    tag = f"net-tsofe-n{n}-r{rnd}"
    proc, socks = start_daemon("net", n, workdir, [], tag)
    ctl = control_path(workdir, tag)
    row: Row = {"kind": "net-tsofe", "n": n, "k": n, "round": rnd}
    fes: list[TsoFrontend] = []
    try:
        snapshot(proc, "idle", row)
        for i, sock in enumerate(socks):
            fes.append(TsoFrontend(tsofe, sock, args.seconds + 2 + n / 50, None, workdir / f"{tag}-fe{i}.log",
                                   ["--frame", "60", "--ring", str(NET_QUEUE_SIZE)]))
        for fe in fes:
            fe.start()
        time.sleep(1.0)   # warm-up (and every front-end started)
        f0, w0 = tx_frames(ctl), Window.now(proc.pid)
        time.sleep(args.seconds)
        f1, w1 = tx_frames(ctl), Window.now(proc.pid)
        row |= window_fields(w0, w1, f1 - f0)
        row["mpps"] = (f1 - f0) / (w1.t - w0.t) / 1e6
        results = [fe.result() for fe in fes]
        per_device = [float(r["mpps"]) for r in results]
        row["mpps_spread"] = max(per_device) / min(per_device) if min(per_device) > 0 else None
        row["workers"] = thread_names(proc.pid)["workers"]
    except BenchError as e:
        raise BenchError(f"{tag}: {e}\n--- vhostd log ---\n{proc.log()}") from None
    finally:
        for fe in fes:
            fe.close()
        proc.stop()
    return row


def run_net(n: int, workdir: Path, args: argparse.Namespace, rnd: int) -> Row:
    tag = f"net-n{n}-r{rnd}"
    proc, socks = start_daemon("net", n, workdir, [], tag)
    row: Row = {"kind": "net", "n": n, "k": n, "round": rnd}
    try:
        snapshot(proc, "idle", row)
        with net_frontend(socks, workdir / f"{tag}-testpmd.log") as pmd:
            snapshot(proc, "attached", row)
            pmd.command("start")
            time.sleep(1.0)   # warm-up
            f0, w0 = port_totals(pmd), Window.now(proc.pid)
            time.sleep(args.seconds)
            f1, w1 = port_totals(pmd), Window.now(proc.pid)
            pmd.command("stop")
            row |= window_fields(w0, w1, f1 - f0)
            row["mpps"] = (f1 - f0) / (w1.t - w0.t) / 1e6
            snapshot(proc, "loaded", row)
        snapshot(proc, "detached", row)
        row["workers"] = thread_names(proc.pid)["workers"]
    except BenchError as e:
        raise BenchError(f"{tag}: {e}\n--- vhostd log ---\n{proc.log()}") from None
    finally:
        proc.stop()
    return row


# --- many idle devices ----------------------------------------------------------------------------


def idle_devices_config(n: int, workdir: Path) -> tuple[str, list[Path], list[str]]:
    """n devices, even ones blk (2 queues, 1 MiB sparse images), odd ones null net."""
    kinds = ["blk" if i % 2 == 0 else "net" for i in range(n)]
    images = [workdir / f"idle{i}.img" for i in range(n)]
    for kind, image in zip(kinds, images):
        if kind == "blk" and not image.exists():
            with open(image, "wb") as f:
                f.truncate(1 << 20)
    text = "".join(device_config(kind, i, workdir, images, queues=2) for i, kind in enumerate(kinds))
    return text, [workdir / f"{kind}{i}.sock" for i, kind in enumerate(kinds)], kinds


def run_idle(n: int, workdir: Path, args: argparse.Namespace, rnd: int) -> Row:
    row: Row = {"kind": "idle", "n": n, "k": 0, "round": rnd}
    # The fixed part: a daemon with no device.
    proc, row["startup_s_0dev"] = start_serve("", [], workdir, f"idle0-r{rnd}")
    try:
        time.sleep(SETTLE_S)
        base = memory(proc.pid)
    finally:
        proc.stop()
    tag = f"idle-n{n}-r{rnd}"
    text, socks, kinds = idle_devices_config(n, workdir)
    proc, row["startup_s"] = start_serve(text, socks, workdir, tag)
    ctl = control_path(workdir, tag)
    sys.path.insert(0, str(REPO / "tests"))
    from scale_load import Load   # the tests' verified-I/O front-end

    loads: list[Load] = []
    try:
        time.sleep(SETTLE_S)
        row["idle_cpu_s"] = idle_cpu(proc.pid, args.idle_seconds)
        mem = memory(proc.pid)
        row |= {"rss_mib": mem["rss_mib"], "anon_mib": mem["anon_mib"], "fds": mem["fds"],
                "rss_kib_per_device": 1024 * (mem["rss_mib"] - base["rss_mib"]) / n,
                "anon_kib_per_device": 1024 * (mem["anon_mib"] - base["anon_mib"]) / n,
                "threads": thread_names(proc.pid)}
        ms = status_ms(ctl)
        row["status_ms"], row["status_ms_max"] = statistics.median(ms), max(ms)
        # Every device gets a front-end: a few verified requests, then connected and idle.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < 16 * n:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(16 * n, hard), hard))
        t0 = time.monotonic()
        for i, (sock, kind) in enumerate(zip(socks, kinds)):
            loads.append(Load(sock, kind, i, queues=2 if kind == "blk" else 1, qd=1))
        row["connect_s"] = time.monotonic() - t0
        while any(ld.completed < 4 for ld in loads):
            if time.monotonic() - t0 > 60:
                raise BenchError("front-ends got no completions within 60 s")
            if sum(ld.step() for ld in loads) == 0:
                time.sleep(0.001)
        errors = [e for ld in loads for e in ld.errors]
        if errors:
            raise BenchError("verification failed: " + "; ".join(errors[:5]))
        time.sleep(SETTLE_S)
        row["connected_idle_cpu_s"] = idle_cpu(proc.pid, args.idle_seconds)
        mem = memory(proc.pid)
        row |= {"connected_rss_mib": mem["rss_mib"], "connected_anon_mib": mem["anon_mib"],
                "connected_shmem_mib": mem["shmem_mib"], "connected_fds": mem["fds"],
                "connected_anon_kib_per_device": 1024 * (mem["anon_mib"] - base["anon_mib"]) / n,
                "connected_threads": thread_names(proc.pid)}
        ms = status_ms(ctl)
        row["connected_status_ms"], row["connected_status_ms_max"] = statistics.median(ms), max(ms)
        st = control.request(ctl, "status")["status"]
        row["rings_running"] = sum(1 for d in st["devices"] for r in d.get("rings", []) if r["running"])
    except BenchError as e:
        raise BenchError(f"{tag}: {e}\n--- vhostd log ---\n{proc.log()}") from None
    finally:
        for ld in loads:
            ld.close()
        proc.stop()
    return row


# --- summary ------------------------------------------------------------------------------------


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x."""
    if len({x for x, _ in points}) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    return (sum((x - mx) * (y - my) for x, y in points)
            / sum((x - mx) ** 2 for x, _ in points))


# RSS counts the guest's (front-end's) shared memory pages the daemon touched through its
# mappings (shmem, one mapping per device, fault-around included): loaded RSS is mostly guest
# RAM, not the daemon's own; anon is the daemon's private memory.
MEMORY_COLUMNS = ("idle_rss_mib", "idle_anon_mib", "attached_rss_mib", "attached_anon_mib",
                  "loaded_anon_mib", "loaded_shmem_mib", "detached_rss_mib", "detached_anon_mib")


def med(rows: list[Row], key: str) -> Any:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def vs_one(rows: list[Row], runs: list[Row], key: str) -> float | None:
    """Median over rounds of rows' key / the same round's N=1 figure (same kind)."""
    ratios = []
    for r in rows:
        one = [o for o in runs if o["kind"] == r["kind"] and o["n"] == 1 and o["round"] == r["round"]]
        if one and one[0].get(key) and r.get(key) is not None:
            ratios.append(r[key] / one[0][key])
    return statistics.median(ratios) if ratios else None


def summary_row(kind: str, n: int, mine: list[Row], runs: list[Row]) -> Row:
    row: Row = {"kind": kind, "n": n, "k": mine[0]["k"]}
    row |= {c: med(mine, c) for c in MEMORY_COLUMNS}
    row |= {"threads_attached": med(mine, "attached_threads"), "workers": med(mine, "workers"),
            "kops": med(mine, "kops"), "cpu_s_per_mop": med(mine, "cpu_s_per_mop"),
            "daemon_cpu_pct": med(mine, "daemon_cpu_pct"), "switches_per_kop": med(mine, "switches_per_kop"),
            "daemon_wait_pct": med(mine, "daemon_wait_pct"),
            "cpu0_busy_pct": med(mine, "cpu0_busy_pct"), "cpu1_busy_pct": med(mine, "cpu1_busy_pct")}
    if kind == "blk":
        row |= {"iops": med(mine, "iops"), "iops_vs_1": vs_one(mine, runs, "iops"),
                "cpu_vs_1": vs_one(mine, runs, "cpu_s_per_mop"), "iops_spread": med(mine, "iops_spread")}
    else:
        row |= {"mpps": med(mine, "mpps"), "mpps_vs_1": vs_one(mine, runs, "mpps"),
                "cpu_vs_1": vs_one(mine, runs, "cpu_s_per_mop"), "mpps_spread": med(mine, "mpps_spread")}
    row["per_run"] = mine
    return row


def slope_row(kind: str, runs: list[Row]) -> Row:
    """MiB per added device: the slope of each memory column over N."""
    row: Row = {"kind": kind, "n": "per device", "k": None}
    for c in MEMORY_COLUMNS:
        row[c] = slope([(r["n"], r[c]) for r in runs if r.get(c) is not None])
    row["threads_attached"] = slope([(r["n"], r["attached_threads"]) for r in runs
                                     if r.get("attached_threads") is not None])
    return row


IDLE_COLUMNS = ("startup_s", "startup_s_0dev", "idle_cpu_s", "rss_mib", "rss_kib_per_device",
                "anon_kib_per_device", "status_ms", "status_ms_max", "fds", "connect_s", "rings_running",
                "connected_idle_cpu_s", "connected_rss_mib", "connected_anon_mib", "connected_shmem_mib",
                "connected_anon_kib_per_device", "connected_status_ms", "connected_status_ms_max",
                "connected_fds")


def idle_summary(mine: list[Row]) -> Row:
    row: Row = {"kind": "idle", "n": mine[0]["n"], "k": 0}
    row |= {c: med(mine, c) for c in IDLE_COLUMNS}
    row["threads"] = mine[-1]["threads"]
    row["connected_threads"] = mine[-1]["connected_threads"]
    row["per_run"] = mine
    return row


def anchor_summary(runs: list[Row], n: int) -> list[Row]:
    """qsd-shared, qsd-each and vhostd (blk rows of the same N) with vhostd's same-round ratios."""
    vhostd = [r for r in runs if r["kind"] == "blk" and r["n"] == n]
    rows: list[Row] = []
    for backend, mine in [("vhostd", vhostd), *[(m, [r for r in runs if r.get("backend") == m]) for m in QSD_MODES]]:
        if not mine:
            continue
        row: Row = {"kind": "qsd", "backend": backend, "n": n, "k": n, "iops": med(mine, "iops"),
                    "cpu_s_per_mop": med(mine, "cpu_s_per_mop"), "iops_spread": med(mine, "iops_spread"),
                    "daemon_cpu_pct": med(mine, "daemon_cpu_pct"), "daemon_wait_pct": med(mine, "daemon_wait_pct"),
                    "cpu0_busy_pct": med(mine, "cpu0_busy_pct"),
                    "cpu1_busy_pct": med(mine, "cpu1_busy_pct")}
        for anchor in QSD_MODES:
            if backend != "vhostd":
                continue
            pairs = [(v, a) for v in vhostd for a in runs
                     if a.get("backend") == anchor and a["round"] == v["round"]]
            if pairs:
                row[f"iops_vs_{anchor}"] = statistics.median(v["iops"] / a["iops"] for v, a in pairs)
                row[f"cpu_vs_{anchor}"] = statistics.median(v["cpu_s_per_mop"] / a["cpu_s_per_mop"]
                                                            for v, a in pairs)
        row["per_run"] = mine
        rows.append(row)
    return rows


def summarize(runs: list[Row], kinds: list[str], ns: list[int], anchor_n: int) -> list[Row]:
    rows: list[Row] = []
    for kind in ("blk", *NET_KINDS):
        if kind not in kinds:
            continue
        mine = [r for r in runs if r["kind"] == kind and r.get("sweep", True)]
        rows += [summary_row(kind, n, [r for r in mine if r["n"] == n], runs) for n in ns
                 if any(r["n"] == n for r in mine)]
        if mine:
            rows.append(slope_row(kind, mine))
    if "idle" in kinds:
        rows.append(idle_summary([r for r in runs if r["kind"] == "idle"]))
    if "qsd" in kinds:
        rows += anchor_summary(runs, anchor_n)
    return rows


def run(args: argparse.Namespace) -> list[Row]:
    ns = sorted(set(net.int_list(args.devices)))
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not ns or min(ns) < 1 or not kinds or any(k not in KINDS for k in kinds):
        raise BenchError(f"--devices: positive integers; --kinds: from {', '.join(KINDS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vhostd-bench-scaling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    image_dir: Path | None = None
    runs: list[Row] = []
    anchor_n = args.anchor_exports
    try:
        images: list[Path] = []
        exe: Path | None = None
        tsofe = build_tsofe(workdir) if "net-tsofe" in kinds else None
        if "blk" in kinds or "qsd" in kinds:
            exe = blk_backend.build_blkfe()
            count = max([*(ns if "blk" in kinds else []), *([anchor_n] if "qsd" in kinds else [])])
            image_dir, images = make_images(count, args.image_mib, args.tmpfs_dir)
        for rnd in range(1, args.rounds + 1):
            for kind in kinds:
                if kind == "idle":
                    progress(f"scaling round {rnd}/{args.rounds}: {args.idle_devices} idle devices")
                    r = run_idle(args.idle_devices, workdir, args, rnd)
                    runs.append(r)
                    progress(f"  start-up {r['startup_s']:.2f} s, idle CPU {r['idle_cpu_s']:.2f} s, "
                             f"{r['rss_kib_per_device']:.0f} KiB RSS per device; connected: idle CPU "
                             f"{r['connected_idle_cpu_s']:.2f} s, status {r['connected_status_ms']:.1f} ms")
                    continue
                if kind == "qsd":
                    assert exe is not None
                    if not any(r["kind"] == "blk" and r["n"] == anchor_n and r["round"] == rnd for r in runs):
                        progress(f"scaling round {rnd}/{args.rounds}: anchor, vhostd N={anchor_n}")
                        r = run_blk(anchor_n, exe, images, workdir, args, rnd)
                        r["sweep"] = anchor_n in ns
                        runs.append(r)
                    for mode in QSD_MODES:
                        progress(f"scaling round {rnd}/{args.rounds}: anchor, {mode} N={anchor_n}")
                        r = run_qsd(mode, anchor_n, exe, images, workdir, args, rnd)
                        runs.append(r)
                        progress(f"  {r['kops']:.1f} kIOPS, CPU0 {r['cpu0_busy_pct']:.0f}% "
                                 f"CPU1 {r['cpu1_busy_pct']:.0f}%")
                    continue
                for n in ns:
                    progress(f"scaling round {rnd}/{args.rounds}: {kind} N={n}")
                    if kind == "blk":
                        assert exe is not None
                        r = run_blk(n, exe, images, workdir, args, rnd)
                    elif kind == "net-tsofe":
                        assert tsofe is not None
                        r = run_net_tsofe(n, workdir, args, rnd, tsofe)
                    else:
                        r = run_net(n, workdir, args, rnd)
                    runs.append(r)
                    progress(f"  RSS idle {r['idle_rss_mib']:.1f} MiB, attached "
                             f"{r.get('attached_rss_mib') or 0:.1f} MiB; {r['kops']:.1f} kops/s with K={r['k']}, "
                             f"daemon CPU {r['daemon_cpu_pct']:.0f}% (waited {r['daemon_wait_pct']:.0f}%), "
                             f"CPU0 {r['cpu0_busy_pct']:.0f}% "
                             f"CPU1 {r['cpu1_busy_pct']:.0f}%")
        return summarize(runs, kinds, ns, anchor_n)
    finally:
        if image_dir is not None:
            shutil.rmtree(image_dir, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark(
    name="scaling",
    help="N devices (1, 4, 16, 64) in one `vhostd serve` on 2 cores: aggregate blk IOPS "
         "(4k randread QD32, tmpfs) and null-net Mpps vs 1 device, CPU per op, per-device spread; "
         "256 idle devices (start-up, CPU, RSS, status latency, unconnected and connected); "
         "qemu-storage-daemon anchor with 16 exports on one shared iothread vs one each",
    run=run,
    add_arguments=add_arguments,
    unavailable=unavailable,
)
