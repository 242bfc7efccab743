"""net-tx: guest TX, front-end -> back-end -> tap, without a VM.

DPDK's virtio_user front-end (dpdk-testpmd txonly, CPU 1) fills the TX ring as fast as it can;
the back-end (CPU 0) moves the frames into a tap inside a network namespace of our own, and
the tap's rx_packets counter says how many arrived, over a fixed window after a warm-up.
Back-ends: `vhostd net` and the anchor, DPDK's net_vhost bridged to net_tap by testpmd io
forwarding.  The tap-write bound is tapbound.c writing frames of each size into a tap from
CPU 0 with nothing else around: what one core can push through tap writes at all.
Runs interleave: vhostd, dpdk, bound, vhostd, dpdk, bound, ...
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench import Benchmark, BenchError, Row, progress
from bench import _net as net
from bench._net import BOUND, TAP, NetNs

BOUND_TAP = "nbbound0"  # tapbound creates it and it vanishes when tapbound exits


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=5.0,
                   help="measured window per run (default 5)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of traffic before the window opens (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--sizes", default="64,1518",
                   help="Ethernet frame sizes with FCS, as in RFC 2544; the tap carries 4 bytes "
                        "less (default 64,1518)")
    p.add_argument("--queue-size", type=int, default=1024,
                   help="virtio_user ring size (default 1024)")
    net.add_vhostd_args(p)
    p.add_argument("--workdir", type=Path, default=None,
                   help="sockets, logs and the tapbound binary (default: a temporary directory)")


def run_backend(backend: str, size: int, ns: NetNs, workdir: Path, args: argparse.Namespace,
                rnd: int) -> Row:
    sock = workdir / f"{backend}.sock"
    tag = f"{backend}-{size}-r{rnd}"
    be = net.start_backend(backend, ns, sock, TAP, workdir / f"{tag}.log", args.vhostd_args)
    try:
        with net.frontend(sock, "txonly", workdir / f"frontend-{tag}.log", args.queue_size,
                          [f"--txpkts={net.carried(size)}"]) as fe:
            fe.command("start")
            time.sleep(args.warmup)
            f0 = fe.fwd_stats(0)
            s0, t0 = net.tap_counters(ns, TAP)
            c0, w0 = be.cpu_seconds(), (net.run_delay(be.pid), net.run_delay(fe.pid))
            time.sleep(args.seconds)
            s1, t1 = net.tap_counters(ns, TAP)
            c1, w1 = be.cpu_seconds(), (net.run_delay(be.pid), net.run_delay(fe.pid))
            f1 = fe.fwd_stats(0)
            fe.command("stop")
    finally:
        rc = net.stop_backend(backend, be)
    frames = s1["rx_packets"] - s0["rx_packets"]
    if frames <= 0:
        raise BenchError(f"{backend}: no frames reached the tap\n{net.log_tail(be)}")
    window = t1 - t0
    sent, refused = f1["tx_packets"] - f0["tx_packets"], f1["tx_dropped"] - f0["tx_dropped"]
    return {
        "backend": backend, "size": size, "round": rnd, "exit_rc": rc,
        "mpps": frames / window / 1e6,
        "gbps": (s1["rx_bytes"] - s0["rx_bytes"]) * 8 / window / 1e9,
        "frames": frames,
        "window_s": window,
        "cpu_pct": 100 * (c1 - c0) / window,
        # The back-end's CPU per frame: unlike the rate, it holds when the CPU is shared.
        "cpu_us_per_frame": (c1 - c0) / frames * 1e6,
        "tap_rx_dropped": s1["rx_dropped"] - s0["rx_dropped"],
        # Time the back-end / front-end were runnable but another process had their CPU.
        "be_wait_pct": 100 * (w1[0] - w0[0]) / window,
        "fe_wait_pct": 100 * (w1[1] - w0[1]) / window,
        # Frames testpmd tried to send, and the share a full ring refused: near 0, the
        # front-end (not the back-end) set the pace and the run says little about the back-end.
        "offered_mpps": (sent + refused) / window / 1e6,
        "ring_full_pct": 100 * refused / max(1, sent + refused),
    }


def run_bound(binary: Path, size: int, ns: NetNs, args: argparse.Namespace, rnd: int) -> Row:
    argv = net.tapbound_argv(ns, binary, net.BACKEND_CPU, "write", BOUND_TAP, args.seconds,
                              net.carried(size))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=args.seconds + 30)
    res = net.parse_tapbound(r.stdout + r.stderr)
    return {
        "backend": BOUND, "size": size, "round": rnd,
        "mpps": res["fps"] / 1e6,
        "gbps": res["fps"] * net.carried(size) * 8 / 1e9,
        "frames": int(res["frames"]),
        "window_s": res["seconds"],
        "cpu_pct": 100 * res["cpu_s"] / res["seconds"],
        "cpu_us_per_frame": res["cpu_s"] / res["frames"] * 1e6 if res["frames"] else None,
    }


def summarize(runs: list[Row], sizes: list[int]) -> list[Row]:
    return [{
        "size_B": size,
        **net.rate_columns(runs, size),
        # Other load: how long the back-ends and front-ends waited for their CPU.
        "be_wait_pct": net.backends_median(runs, "be_wait_pct", size),
        "fe_wait_pct": net.backends_median(runs, "fe_wait_pct", size),
        "per_run": [r for r in runs if r["size"] == size],
    } for size in sizes]


def run(args: argparse.Namespace) -> list[Row]:
    sizes = net.int_list(args.sizes)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vhostd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        binary = net.build_tapbound(workdir)
        runs: list[Row] = []
        with net.netns("bench-tx") as ns:
            for rnd in range(1, args.rounds + 1):
                for size in sizes:
                    for backend in net.BACKENDS:
                        progress(f"net-tx round {rnd}/{args.rounds}: {backend} {size} B")
                        runs.append(run_backend(backend, size, ns, workdir, args, rnd))
                        progress(f"  {runs[-1]['mpps']:.3f} Mpps, CPU {runs[-1]['cpu_pct']:.0f}%")
                    progress(f"net-tx round {rnd}/{args.rounds}: {BOUND} {size} B")
                    runs.append(run_bound(binary, size, ns, args, rnd))
                    progress(f"  {runs[-1]['mpps']:.3f} Mpps")
        return summarize(runs, sizes)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark(
    name="net-tx",
    help="guest TX to a tap, DPDK virtio_user front-end: vhostd vs DPDK net_vhost+net_tap "
         "(Mpps, Gbit/s, fraction of the tap-write bound)",
    run=run,
    add_arguments=add_arguments,
    unavailable=net.unavailable,
)
