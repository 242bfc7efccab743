"""scaling: N devices in ONE `vhostd serve` process: memory per device and aggregate throughput.

For each N (default 1, 4, 16) a fresh `vhostd serve --config` runs N devices, each on its own
socket, and we read the process's memory (/proc/PID/status: VmRSS and its anonymous part,
threads) at four points: idle (N devices listening), attached (N front-ends connected, rings
started, no I/O), loaded (after K front-ends ran I/O, still attached) and detached (all
front-ends gone).  Memory per device is the least-squares slope over N.  RssAnon is the
daemon's own memory; RssShmem is guest RAM (the front-ends' memfds) it touched through its
mappings, counted once per device mapping it.

blk: N devices on tmpfs images (random data, /dev/shm); N blkfe front-ends (bench/blkfe.c,
--sync) attach; K = min(N, --max-active) of them then run 4k randread at QD 32 on one queue
each, at the same time; the others stay attached and idle.  Result: aggregate IOPS and the
daemon's CPU seconds per million requests over the window.
net: N devices with the null back-end; one dpdk-testpmd with N virtio_user ports (ring 256)
attaches to all of them and sends 60-byte frames on all N in txonly mode.  Result: aggregate
Mpps and CPU seconds per million frames (= CPU share per Mpps).

Placement (2 cores): the daemon (all its threads) on CPU 0, every front-end on CPU 1, as in
blk-backend and net-tx.  `cpu0_busy_pct` / `cpu1_busy_pct` (from /proc/stat, all processes)
say which side saturated: ~100% on CPU 0 with the daemon near 100% means the back-end set the
pace; ~100% on CPU 1 the front-ends did (testpmd busy-polls: CPU 1 is always 100% for net).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import Benchmark, BenchError, Process, Row, cpu_seconds, progress, unix_listening
from bench import _net as net
from bench import blk_backend
from bench.blk_backend import Frontend, Workload

KINDS = ("blk", "net")
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
    p.add_argument("--devices", default="1,4,16", help="values of N (default 1,4,16)")
    p.add_argument("--kinds", default="blk,net", help="blk, net or both (default both)")
    p.add_argument("--max-active", type=int, default=4,
                   help="blk: front-ends running I/O at once, K = min(N, this) (default 4)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured I/O window (default 5)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds; each runs every N once, a fresh daemon each time (default 2)")
    p.add_argument("--image-mib", type=int, default=64, help="blk image size (default 64)")
    p.add_argument("--tmpfs-dir", type=Path, default=Path("/dev/shm"))
    p.add_argument("--workdir", type=Path, default=None,
                   help="config, sockets and logs (default: a temporary directory, removed)")


def unavailable() -> str | None:
    for tool in ("cc", "taskset", net.TESTPMD):
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

    @staticmethod
    def now(pid: int) -> Window:
        return Window(time.monotonic(), cpu_seconds(pid), cpu_times(), context_switches(pid))


def window_fields(w0: Window, w1: Window, ops: int) -> Row:
    secs, cpu = w1.t - w0.t, w1.daemon_cpu - w0.daemon_cpu
    return {
        "kops": ops / secs / 1e3,
        "daemon_cpu_pct": 100 * cpu / secs,
        "cpu_s_per_mop": cpu / (ops / 1e6) if ops else None,
        # Why CPU per op grows with more active rings: each ring's worker sleeps and wakes alone.
        "switches_per_kop": 1000 * (w1.switches - w0.switches) / ops if ops else None,
        "cpu0_busy_pct": busy_pct(w0.cpus, w1.cpus, net.BACKEND_CPU),
        "cpu1_busy_pct": busy_pct(w0.cpus, w1.cpus, net.FRONTEND_CPU),
        "window_s": secs,
    }


# --- the daemon --------------------------------------------------------------------------------


def device_config(kind: str, i: int, workdir: Path, images: list[Path]) -> str:
    sock = workdir / f"{kind}{i}.sock"
    if kind == "blk":
        return (f'[devices.blk{i}]\ntype = "blk"\nsocket = "{sock}"\nfile = "{images[i]}"\n'
                f"num_queues = 1\n")
    return f'[devices.net{i}]\ntype = "net"\nsocket = "{sock}"\nbackend = "null"\n'


def start_daemon(kind: str, n: int, workdir: Path, images: list[Path], tag: str) -> tuple[Process, list[Path]]:
    """`vhostd serve` with n devices of one kind on CPU 0, once every socket listens."""
    cfg = workdir / f"{tag}.toml"
    cfg.write_text("".join(device_config(kind, i, workdir, images) for i in range(n)))
    socks = [workdir / f"{kind}{i}.sock" for i in range(n)]
    for s in socks:
        s.unlink(missing_ok=True)
    argv = net.pinned(net.BACKEND_CPU, [sys.executable, "-m", "vhostd", "serve", "--config", str(cfg)])
    proc = Process(argv, workdir / f"{tag}.log", socket=socks[-1])
    deadline = time.monotonic() + 30
    while not all(unix_listening(s) for s in socks):
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            log = proc.log()
            proc.stop()
            raise BenchError(f"vhostd serve did not listen on all {n} sockets:\n{log}")
        time.sleep(0.05)
    return proc, socks


def snapshot(proc: Process, label: str, row: Row) -> None:
    """Memory at one point, as columns `<label>_<what>`; waits for the daemon to settle."""
    time.sleep(SETTLE_S)
    if proc.proc.poll() is not None:
        raise BenchError(f"vhostd serve exited with {proc.proc.returncode}:\n{proc.log()}")
    for key, value in memory(proc.pid).items():
        row[f"{label}_{key}"] = value


# --- blk ----------------------------------------------------------------------------------------


def make_images(n: int, mib: int, tmpfs: Path) -> tuple[Path, list[Path]]:
    d = Path(tempfile.mkdtemp(prefix="vhostd-scaling-", dir=tmpfs))
    images = [d / f"disk{i}.img" for i in range(n)]
    progress(f"scaling: writing {n} images of {mib} MiB in {tmpfs}")
    for image in images:
        blk_backend.make_image(image, mib)
    return d, images


def run_blk_io(active: list[Frontend], proc: Process) -> Row:
    """Starts the active front-ends together; their requests over the daemon's CPU."""
    w0 = Window.now(proc.pid)
    for fe in active:
        fe.go()
    results = [fe.result() for fe in active]
    w1 = Window.now(proc.pid)
    requests = sum(int(r["requests"]) for r in results)
    row = window_fields(w0, w1, requests)
    row["iops"] = sum(float(r["iops"]) for r in results)
    row["p99_us_max"] = max(float(r["p99_us"]) for r in results)
    row["fe_results"] = results
    return row


def run_blk(n: int, exe: Path, images: list[Path], workdir: Path, args: argparse.Namespace,
            rnd: int) -> Row:
    tag = f"blk-n{n}-r{rnd}"
    k = min(n, args.max_active)
    proc, socks = start_daemon("blk", n, workdir, images, tag)
    row: Row = {"kind": "blk", "n": n, "k": k, "round": rnd}
    fes: list[Frontend] = []
    try:
        snapshot(proc, "idle", row)
        for i, sock in enumerate(socks):
            fes.append(Frontend(exe, sock, RANDREAD, args.seconds, str(net.FRONTEND_CPU),
                                rnd * 100 + i, workdir / f"{tag}-fe{i}.log"))
        for fe in fes:
            fe.wait_ready()
        snapshot(proc, "attached", row)
        row |= run_blk_io(fes[:k], proc)
        snapshot(proc, "loaded", row)
        for fe in fes:
            fe.close()   # the idle ones exit 2: stdin closed before their go line
        fes = []
        snapshot(proc, "detached", row)
    except BenchError as e:
        raise BenchError(f"{tag}: {e}\n--- vhostd log ---\n{proc.log()}") from None
    finally:
        for fe in fes:
            fe.close()
        proc.stop()
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
    except BenchError as e:
        raise BenchError(f"{tag}: {e}\n--- vhostd log ---\n{proc.log()}") from None
    finally:
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


def summary_row(kind: str, n: int, mine: list[Row]) -> Row:
    def med(key: str) -> Any:
        values = [r[key] for r in mine if r.get(key) is not None]
        return statistics.median(values) if values else None

    row: Row = {"kind": kind, "n": n, "k": mine[0]["k"]}
    row |= {c: med(c) for c in MEMORY_COLUMNS}
    row |= {"threads_attached": med("attached_threads"),
            "kops": med("kops"), "cpu_s_per_mop": med("cpu_s_per_mop"),
            "daemon_cpu_pct": med("daemon_cpu_pct"), "switches_per_kop": med("switches_per_kop"),
            "cpu0_busy_pct": med("cpu0_busy_pct"), "cpu1_busy_pct": med("cpu1_busy_pct"),
            "per_run": mine}
    return row


def slope_row(kind: str, runs: list[Row]) -> Row:
    """MiB per added device: the slope of each memory column over N."""
    row: Row = {"kind": kind, "n": "per device", "k": None}
    for c in MEMORY_COLUMNS:
        row[c] = slope([(r["n"], r[c]) for r in runs if r.get(c) is not None])
    row["threads_attached"] = slope([(r["n"], r["attached_threads"]) for r in runs])
    return row


def summarize(runs: list[Row], kinds: list[str], ns: list[int]) -> list[Row]:
    rows: list[Row] = []
    for kind in kinds:
        mine = [r for r in runs if r["kind"] == kind]
        rows += [summary_row(kind, n, [r for r in mine if r["n"] == n]) for n in ns
                 if any(r["n"] == n for r in mine)]
        if mine:
            rows.append(slope_row(kind, mine))
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
    try:
        images: list[Path] = []
        exe: Path | None = None
        if "blk" in kinds:
            exe = blk_backend.build_blkfe()
            image_dir, images = make_images(max(ns), args.image_mib, args.tmpfs_dir)
        for rnd in range(1, args.rounds + 1):
            for kind in kinds:
                for n in ns:
                    progress(f"scaling round {rnd}/{args.rounds}: {kind} N={n}")
                    if kind == "blk":
                        assert exe is not None
                        r = run_blk(n, exe, images, workdir, args, rnd)
                    else:
                        r = run_net(n, workdir, args, rnd)
                    runs.append(r)
                    progress(f"  RSS idle {r['idle_rss_mib']:.1f} MiB, attached "
                             f"{r['attached_rss_mib']:.1f} MiB; {r['kops']:.1f} kops/s with K={r['k']}, "
                             f"daemon CPU {r['daemon_cpu_pct']:.0f}%, CPU0 {r['cpu0_busy_pct']:.0f}% "
                             f"CPU1 {r['cpu1_busy_pct']:.0f}%")
        return summarize(runs, kinds, ns)
    finally:
        if image_dir is not None:
            shutil.rmtree(image_dir, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark(
    name="scaling",
    help="N devices (1, 4, 16) in one `vhostd serve`: RSS idle/attached and per device, "
         "aggregate blk IOPS (K blkfe, 4k randread QD32) and null-net Mpps, CPU per million ops",
    run=run,
    add_arguments=add_arguments,
    unavailable=unavailable,
)
