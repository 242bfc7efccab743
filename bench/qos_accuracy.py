"""qos-accuracy: how exactly a QoS limit holds, target against measured rate, and what the
limit costs in back-end CPU per request.

blk: bench/blkfe.c (one queue, pinned to CPU 1) saturates a disk limited to `--iops`
(4 KiB randread QD32) or `--bw-mib` MiB/s (64 KiB randwrite QD16), served on CPU 0 in turn by
`vhostd blk --limit ...` and by the anchor, qemu-storage-daemon with the equivalent QEMU
throttle group (`--object throttle-group,id=tg,x-iops-total=N` / `x-bps-write=N` and a
`driver=throttle` blockdev over the file node: what libvirt's `<iotune>` gives QEMU's own
disks).  The rate is blkfe's own (requests completed over its measured window, --seconds);
both back-ends start with QEMU's full bucket (1/10 s of the rate), which adds 1/(10 x
seconds) to both.  CPU is the back-end process's utime+stime over the window, per request;
`cpu_vs_qsd` is the median of same-round ratios.

net: dpdk-testpmd's virtio_user (CPU 1) sends 60-byte frames (txonly) or receives them
(rxonly) through `vhostd net --backend null` (CPU 0) limited to `--pps` frames/s or
`--tx-bytes` B/s (frame bytes); the rate is vhostd's own counter (status over the control
socket) over the window after `--warmup`, and the front-end's count is given as a check.
There is no anchor for net: DPDK's vhost back-end has no rate limiter.

Rounds interleave the back-ends (A,B,A,B...), a fresh process for each run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import Benchmark, BenchError, Process, Row, progress
from bench import _net as net
from bench.blk_backend import Frontend, Workload, _taskset, build_blkfe, make_image, placement
from vhostd import control as ctl

PAYLOAD = 60   # frame bytes of testpmd's --txpkts (a 64 B frame without its FCS)


@dataclass(frozen=True)
class BlkCase:
    name: str
    workload: Workload
    vhostd_limit: str      # vhostd blk --limit KEY=VALUE
    qsd_throttle: str      # throttle-group property
    unit: str              # "IOPS" or "B/s"


@dataclass(frozen=True)
class NetCase:
    name: str
    mode: str              # the front-end's testpmd forwarding mode
    limit_key: str
    counter: str           # the queue-pair counter vhostd keeps for it
    unit: str


def blk_cases(args: argparse.Namespace) -> list[BlkCase]:
    bw = int(args.bw_mib * (1 << 20))
    return [
        BlkCase(f"blk total_iops_sec={args.iops}", Workload("randread-4k-qd32", "randread", 4096, 32),
                f"total_iops_sec={args.iops}", f"x-iops-total={args.iops}", "IOPS"),
        BlkCase(f"blk write_bytes_sec={bw}", Workload("randwrite-64k-qd16", "randwrite", 65536, 16),
                f"write_bytes_sec={bw}", f"x-bps-write={bw}", "B/s"),
    ]


def net_cases(args: argparse.Namespace) -> list[NetCase]:
    return [
        NetCase(f"net tx_packets_sec={args.pps}", "txonly", "tx_packets_sec", "tx_frames", "frames/s"),
        NetCase(f"net tx_bytes_sec={args.tx_bytes}", "txonly", "tx_bytes_sec", "tx_bytes", "B/s"),
        NetCase(f"net rx_packets_sec={args.pps}", "rxonly", "rx_packets_sec", "rx_frames", "frames/s"),
    ]


def target_of(case: BlkCase | NetCase, args: argparse.Namespace) -> float:
    if isinstance(case, BlkCase):
        return float(case.vhostd_limit.split("=")[1])
    return float(args.tx_bytes if case.limit_key == "tx_bytes_sec" else args.pps)


# --- blk ---------------------------------------------------------------------------------------


def blk_argv(backend: str, case: BlkCase, image: Path, sock: Path) -> list[str]:
    if backend == "vhostd":
        return [sys.executable, "-m", "vhostd", "blk", "--socket-path", str(sock), "--file", str(image),
                "--num-queues", "1", "--limit", case.vhostd_limit]
    return ["qemu-storage-daemon",
            "--object", f"throttle-group,id=tg,{case.qsd_throttle}",
            "--blockdev", f"driver=file,node-name=f,filename={image}",
            "--blockdev", "driver=throttle,node-name=t,throttle-group=tg,file=f",
            "--export", f"type=vhost-user-blk,id=e,node-name=t,addr.type=unix,addr.path={sock},"
                        f"writable=on,num-queues=1"]


def run_blk(exe: Path, backend: str, case: BlkCase, image: Path, workdir: Path,
            args: argparse.Namespace, rnd: int) -> Row:
    tag = f"{case.workload.name}-{backend}-r{rnd}"
    sock = workdir / f"{backend}.sock"
    sock.unlink(missing_ok=True)
    where = placement(1)
    argv = _taskset(where.backend_cpus, blk_argv(backend, case, image, sock))
    with Process(argv, workdir / f"{tag}.log", socket=sock) as proc:
        fe = Frontend(exe, sock, case.workload, args.seconds, where.frontend_cpus, rnd,
                      workdir / f"{tag}.blkfe.log")
        try:
            fe.wait_ready()
            cpu0 = proc.cpu_seconds()
            fe.go()
            res = fe.result()
            cpu1 = proc.cpu_seconds()
        except BenchError as e:
            raise BenchError(f"{tag}: {e}\n--- {backend} log ---\n{proc.log()}") from None
        finally:
            rc = fe.close()
        if rc != 0 or proc.proc.poll() is not None:
            raise BenchError(f"{tag}: blkfe exited {rc}\n--- {backend} log ---\n{proc.log()}")
    secs, reqs = res["seconds"], res["requests"]
    measured = res["iops"] if case.unit == "IOPS" else reqs * case.workload.bs / secs
    return {"case": case.name, "backend": backend, "round": rnd, "measured": measured,
            "requests": reqs, "seconds": secs, "cpu_s": cpu1 - cpu0,
            "cpu_pct": 100 * (cpu1 - cpu0) / secs,
            "cpu_us_per_req": 1e6 * (cpu1 - cpu0) / reqs if reqs else None,
            "p99_us": res["p99_us"], "backend_argv": argv}


# --- net ---------------------------------------------------------------------------------------


def vhostd_counter(control: Path, key: str) -> int:
    status: dict[str, Any] = ctl.request(control, "status", timeout=5)["status"]
    return sum(int(p[key]) for p in status["devices"][0]["device"]["queue_pairs"])


def run_net(case: NetCase, workdir: Path, args: argparse.Namespace, rnd: int) -> Row:
    tag = f"{case.limit_key}-r{rnd}"
    sock, control = workdir / "net.sock", workdir / "net.control"
    sock.unlink(missing_ok=True)
    target = int(target_of(case, args))
    argv = [sys.executable, "-m", "vhostd", "net", "--backend", "null", "--socket-path", str(sock),
            "--control-socket", str(control), "--limit", f"{case.limit_key}={target}"]
    be = Process(net.pinned(net.BACKEND_CPU, argv), workdir / f"{tag}.log", socket=sock)
    try:
        with net.frontend(sock, case.mode, workdir / f"frontend-{tag}.log", 1024,
                          [f"--txpkts={PAYLOAD}"]) as fe:
            fe.command("start")
            time.sleep(args.warmup)

            def snap() -> tuple[float, int, int, float, int]:
                if case.mode == "txonly":
                    f = fe.fwd_stats(0)
                    frames, refused = f["tx_packets"], f["tx_dropped"]
                else:
                    frames, refused = fe.port_stats(0)["rx_packets"], 0
                return (time.monotonic(), vhostd_counter(control, case.counter), frames,
                        be.cpu_seconds(), refused)
            t0, c0, f0, cpu0, r0 = snap()
            time.sleep(args.seconds)
            t1, c1, f1, cpu1, r1 = snap()
            fe.command("stop")
        dropped = vhostd_counter(control, "tx_dropped") + vhostd_counter(control, "rx_dropped")
    finally:
        rc = net.stop_backend("vhostd", be)
    window = t1 - t0
    frames = f1 - f0
    fe_rate = frames / window * (PAYLOAD if case.unit == "B/s" else 1)
    return {"case": case.name, "backend": "vhostd", "round": rnd, "exit_rc": rc,
            "measured": (c1 - c0) / window, "frontend_rate": fe_rate, "seconds": window,
            "cpu_pct": 100 * (cpu1 - cpu0) / window,
            "cpu_us_per_req": 1e6 * (cpu1 - cpu0) / frames if frames else None,
            "backend_dropped": dropped,
            "ring_full_pct": (100 * (r1 - r0) / max(1, frames + r1 - r0)) if case.mode == "txonly" else None}


# --- summary -----------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[Row], cases: list[tuple[BlkCase | NetCase, list[str]]],
              args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    for case, backends in cases:
        target = target_of(case, args)
        for b in backends:
            mine = [r for r in runs if r["case"] == case.name and r["backend"] == b]
            errors = [100 * (r["measured"] / target - 1) for r in mine]
            row: Row = {
                "case": case.name, "backend": b, "unit": case.unit, "target": target,
                "measured": _median([r["measured"] for r in mine]),
                "error_pct": _median(errors),
                "worst_error_pct": max(errors, key=abs) if errors else None,
                "cpu_pct": _median([r["cpu_pct"] for r in mine]),
                "cpu_us_per_req": _median([r["cpu_us_per_req"] for r in mine if r["cpu_us_per_req"]]),
            }
            if isinstance(case, BlkCase) and b == "vhostd" and "qsd" in backends:
                anchor = {r["round"]: r for r in runs if r["case"] == case.name and r["backend"] == "qsd"}
                row["cpu_vs_qsd"] = _median([r["cpu_us_per_req"] / anchor[r["round"]]["cpu_us_per_req"]
                                             for r in mine if r["round"] in anchor])
            if isinstance(case, NetCase):
                row["frontend_rate"] = _median([r["frontend_rate"] for r in mine])
                row["backend_dropped"] = sum(r["backend_dropped"] for r in mine)
                row["ring_full_pct"] = _median([r["ring_full_pct"] for r in mine
                                                if r["ring_full_pct"] is not None])
            row["runs"] = len(mine)
            row["per_run"] = mine
            rows.append(row)
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=10, help="measured window per run (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--warmup", type=float, default=1.0, help="net: seconds before the window (default 1)")
    p.add_argument("--iops", type=int, default=2000, help="blk IOPS limit (default 2000)")
    p.add_argument("--bw-mib", type=float, default=20, help="blk write MiB/s limit (default 20)")
    p.add_argument("--pps", type=int, default=100_000, help="net frames/s limit (default 100000)")
    p.add_argument("--tx-bytes", type=int, default=25_000_000,
                   help="net TX bytes/s limit (default 25000000: 200 Mbit/s)")
    p.add_argument("--parts", default="blk,net", help="blk, net or both (default)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="sockets and logs (default: a temporary directory, removed)")


def unavailable() -> str | None:
    if shutil.which("qemu-storage-daemon") is None:
        return "qemu-storage-daemon not found (install qemu-system-common)"
    if shutil.which("taskset") is None:
        return "taskset not found (util-linux)"
    if shutil.which(net.TESTPMD) is None:
        return f"{net.TESTPMD} not found (apt-get install dpdk)"
    return None


def run(args: argparse.Namespace) -> list[Row]:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - {"blk", "net"}:
        raise BenchError(f"--parts: blk, net or both, got {args.parts!r}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vhostd-bench-qos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    image_dir = Path(tempfile.mkdtemp(prefix="vhostd-bench-qos-", dir="/dev/shm"))
    cases: list[tuple[BlkCase | NetCase, list[str]]] = []
    runs: list[Row] = []
    try:
        if "blk" in parts:
            exe = build_blkfe()
            image = image_dir / "disk.img"
            make_image(image, 256)
            for case in blk_cases(args):
                cases.append((case, ["vhostd", "qsd"]))
            for rnd in range(1, args.rounds + 1):
                for c in blk_cases(args):
                    for b in ("vhostd", "qsd"):
                        progress(f"qos-accuracy round {rnd}/{args.rounds}: {c.name} {b}")
                        r = run_blk(exe, b, c, image, workdir, args, rnd)
                        runs.append(r)
                        progress(f"  {r['measured']:.0f} {c.unit}, {r['cpu_us_per_req']:.1f} CPU us/req")
        if "net" in parts:
            cases += [(c, ["vhostd"]) for c in net_cases(args)]
            for rnd in range(1, args.rounds + 1):
                for nc in net_cases(args):
                    progress(f"qos-accuracy round {rnd}/{args.rounds}: {nc.name}")
                    r = run_net(nc, workdir, args, rnd)
                    runs.append(r)
                    progress(f"  {r['measured']:.0f} {nc.unit} (front-end {r['frontend_rate']:.0f}), "
                             f"back-end drops {r['backend_dropped']}")
        return summarize(runs, cases, args)
    finally:
        shutil.rmtree(image_dir, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark(
    name="qos-accuracy",
    help="QoS limits: target vs measured rate and back-end CPU per request; blk against "
         "qemu-storage-daemon with the same QEMU throttle group (blkfe), net TX/RX (testpmd)",
    run=run,
    add_arguments=add_arguments,
    unavailable=unavailable,
)
