"""net-rx: guest RX, tap -> back-end -> front-end, without a VM.

Frames are injected into the tap from inside our namespace, the back-end (CPU 0) reads them
and places them in the RX ring of DPDK's virtio_user front-end (dpdk-testpmd rxonly), whose
port counter RX-packets is read at the edges of a fixed window after a warm-up.  Back-ends:
`vhostd net` and the anchor, DPDK's net_tap bridged to net_vhost by testpmd io forwarding.
The tap-read bound is tapbound.c reading the same injected frames from a tap on CPU 0 into
one cache-hot buffer: one read() per frame and nothing else, the floor of any back-end that
reads a tap frame by frame (both of these do).  Runs interleave: vhostd, dpdk, bound, ...

The injector (tapbound.c) must outrun the back-end, or the run measures the injector.  CPU 0
belongs to the back-end, so the injector shares CPU 1 with the front-end.  The default,
`inject-gso`, sends one 64-segment UDP GSO packet per syscall through AF_PACKET; the kernel
cuts it into frames of the asked size on their way into the tap.  That offers ~2.5 Mpps of
64 B frames from one core (quiet machine), more than either back-end reads, so the tap's
queue stays full and the back-end sets the pace: `tap_dropped_pct` > 0 shows it.  The older
`--injector sendmmsg` (one frame per message, qdisc bypassed) offers only ~0.7 Mpps with the
front-end beside it, below what one core of back-end takes.

The front-end busy-polls; it runs at nice 5 (--frontend-nice) so the injector keeps most of
CPU 1, and the largest split ring (--queue-size 32768) holds the frames that arrive while it
waits for its turn.  With 8192 the front-end ran dry while the injector had CPU 1: vhostd
idled at ~78% CPU and the run measured CPU 1, not the back-end.  The two take turns on CPU 1 in slices of milliseconds, so frames arrive in bursts:
the tap's queue is raised from 1000 to 16384 frames (--tap-queue) to hold a slice's worth,
or the back-end would idle between bursts while the tap drops frames during them.  vhostd's CPU per frame (`vhostd_us_per_frame`) is its cost (DPDK polls: its CPU is
~100% whatever it moves), and `dpdk_ring_full_pct` says how often the front-end, not DPDK,
was short of buffers.
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
from bench._net import ANCHOR, BOUND, TAP, VHOSTD, NetNs

INJECTOR_CPU = net.FRONTEND_CPU
INJECT_MODE = {"gso": "inject-gso", "sendmmsg": "inject"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=5.0,
                   help="measured window per run (default 5)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of traffic before the window opens (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--sizes", default="64,1518",
                   help="Ethernet frame sizes with FCS, as in RFC 2544; the tap carries 4 bytes "
                        "less (default 64,1518)")
    p.add_argument("--queue-size", type=int, default=32768,
                   help="virtio_user ring size (default 32768; see the module doc)")
    p.add_argument("--injector", choices=["gso", "sendmmsg"], default="gso",
                   help="how frames enter the tap: gso (UDP GSO, the kernel segments; default) "
                        "or sendmmsg (one frame per message; slower than the back-ends)")
    p.add_argument("--tap-queue", type=int, default=16384,
                   help="the tap's queue length (txqueuelen), for both back-ends (default 16384; "
                        "see the module doc)")
    p.add_argument("--frontend-nice", type=int, default=5,
                   help="nice value of the front-end, which shares CPU 1 with the injector "
                        "(default 5; see the module doc)")
    net.add_vhostd_args(p)
    p.add_argument("--workdir", type=Path, default=None,
                   help="sockets, logs and the tapbound binary (default: a temporary directory)")


def anchor_stats(be: net.Backend) -> dict[str, int] | None:
    """The anchor's forwarding counters towards the guest (port 0, net_vhost)."""
    return be.fwd_stats(0) if isinstance(be, net.TestPmd) else None


def ring_full_pct(a0: dict[str, int] | None, a1: dict[str, int] | None) -> float | None:
    """Share of the frames the anchor read from the tap that it dropped because the guest's RX
    ring had no buffer: well above 0, the front-end (not the anchor) set the pace.  vhostd has
    no such count: it stops reading the tap while the ring is empty, the tap drops instead."""
    if a0 is None or a1 is None:
        return None
    sent, dropped = a1["tx_packets"] - a0["tx_packets"], a1["tx_dropped"] - a0["tx_dropped"]
    return 100 * dropped / max(1, sent + dropped)


def run_backend(backend: str, size: int, binary: Path, ns: NetNs, workdir: Path,
                args: argparse.Namespace, rnd: int) -> Row:
    sock = workdir / f"{backend}.sock"
    tag = f"{backend}-{size}-r{rnd}"
    be = net.start_backend(backend, ns, sock, TAP, workdir / f"{tag}.log", args.vhostd_args)
    injector: subprocess.Popen[str] | None = None
    try:
        with net.frontend(sock, "rxonly", workdir / f"frontend-{tag}.log", args.queue_size,
                          nice=args.frontend_nice) as fe:
            fe.command("start")
            ns.run(["ip", "link", "set", TAP, "txqueuelen", str(args.tap_queue)])
            # The injector outlives the window by a second, so traffic never stops inside it.
            duration = args.warmup + args.seconds + 1
            injector = subprocess.Popen(
                net.tapbound_argv(ns, binary, INJECTOR_CPU, INJECT_MODE[args.injector], TAP, duration,
                                  net.carried(size)),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(args.warmup)
            p0, t0 = fe.port_stats(0), time.monotonic()
            s0, c0 = net.tap_counters(ns, TAP)[0], be.cpu_seconds()
            w0, a0 = net.run_delay(be.pid), anchor_stats(be)
            time.sleep(args.seconds)
            p1, t1 = fe.port_stats(0), time.monotonic()
            s1, c1 = net.tap_counters(ns, TAP)[0], be.cpu_seconds()
            w1, a1 = net.run_delay(be.pid), anchor_stats(be)
            out, _ = injector.communicate(timeout=duration + 30)
            fe.command("stop")
    finally:
        if injector is not None and injector.poll() is None:
            injector.kill()
            injector.wait()
        rc = net.stop_backend(backend, be)
    sent = net.parse_tapbound(out)
    frames = p1["rx_packets"] - p0["rx_packets"]
    if frames <= 0:
        raise BenchError(f"{backend}: the front-end received nothing\n{net.log_tail(be)}")
    window = t1 - t0
    return {
        "backend": backend, "size": size, "round": rnd, "exit_rc": rc,
        "mpps": frames / window / 1e6,
        "gbps": (p1["rx_bytes"] - p0["rx_bytes"]) * 8 / window / 1e9,
        "frames": frames,
        "window_s": window,
        "cpu_pct": 100 * (c1 - c0) / window,
        # The back-end's CPU per delivered frame: unlike the rate, it holds on a shared CPU
        # (for DPDK, which polls, only while it is saturated).
        "cpu_us_per_frame": (c1 - c0) / frames * 1e6,
        "offered_mpps": sent["attempts_per_s"] / 1e6,
        # No frame refused or dropped by a full tap queue: the injector, not the back-end, set
        # the pace and the run measured nothing about the back-end's limit.
        "injector_bound": sent["errors"] + s1["tx_dropped"] - s0["tx_dropped"]
        < 0.01 * (sent["frames"] + sent["errors"]),
        # Read from the tap by the back-end, and dropped by the tap because nobody read them.
        "tap_tx_mpps": (s1["tx_packets"] - s0["tx_packets"]) / window / 1e6,
        "tap_tx_dropped": s1["tx_dropped"] - s0["tx_dropped"],
        "tap_dropped_pct": 100 * (s1["tx_dropped"] - s0["tx_dropped"])
        / max(1, s1["tx_dropped"] - s0["tx_dropped"] + s1["tx_packets"] - s0["tx_packets"]),
        "frontend_rx_missed": p1["rx_missed"] - p0["rx_missed"],
        # Time the back-end was runnable but another process had CPU 0.
        "be_wait_pct": 100 * (w1 - w0) / window,
        "guest_ring_full_pct": ring_full_pct(a0, a1),
    }


def run_bound(binary: Path, size: int, ns: NetNs, args: argparse.Namespace, rnd: int) -> Row:
    """tapbound `read` on CPU 0 (it creates the tap), fed by the same injector on CPU 1."""
    duration = args.warmup + args.seconds + 1
    reader = subprocess.Popen(
        net.tapbound_argv(ns, binary, net.BACKEND_CPU, "read", TAP, duration + 1, 64),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    injector: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 5
        while ns.run(["ip", "link", "show", TAP], check=False).returncode != 0:
            if time.monotonic() > deadline or reader.poll() is not None:
                raise BenchError(f"tapbound read did not create {TAP}")
            time.sleep(0.05)
        ns.run(["ip", "link", "set", TAP, "txqueuelen", str(args.tap_queue)])
        injector = subprocess.Popen(
            net.tapbound_argv(ns, binary, INJECTOR_CPU, INJECT_MODE[args.injector], TAP, duration,
                              net.carried(size)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(args.warmup)
        s0, t0 = net.tap_counters(ns, TAP)
        time.sleep(args.seconds)
        s1, t1 = net.tap_counters(ns, TAP)
        injector.communicate(timeout=duration + 30)
        reader.communicate(timeout=duration + 30)
    finally:
        for p in (injector, reader):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    frames = s1["tx_packets"] - s0["tx_packets"]
    window = t1 - t0
    dropped = s1["tx_dropped"] - s0["tx_dropped"]
    return {
        "backend": BOUND, "size": size, "round": rnd,
        "mpps": frames / window / 1e6,
        "gbps": (s1["tx_bytes"] - s0["tx_bytes"]) * 8 / window / 1e9,
        "frames": frames,
        "window_s": window,
        # It spins on an empty tap too: its CPU is 100%, its cost per frame 1/rate.
        "cpu_pct": 100.0,
        "cpu_us_per_frame": window / frames * 1e6 if frames else None,
        "tap_dropped_pct": 100 * dropped / max(1, dropped + frames),
        "injector_bound": dropped < 0.01 * (dropped + frames),
    }


def summarize(runs: list[Row], sizes: list[int]) -> list[Row]:
    rows: list[Row] = []
    for size in sizes:
        def med(key: str, backend: str) -> float | None:
            return net.median_of(runs, key, backend, size=size)

        rows.append({
            "size_B": size,
            **net.rate_columns(runs, size),
            "offered_mpps": net.backends_median(runs, "offered_mpps", size),
            "be_wait_pct": net.backends_median(runs, "be_wait_pct", size),
            "dpdk_ring_full_pct": med("guest_ring_full_pct", ANCHOR),
            "vhostd_tap_dropped_pct": med("tap_dropped_pct", VHOSTD),
            "dpdk_tap_dropped_pct": med("tap_dropped_pct", ANCHOR),
            # Runs where no frame was refused or dropped at the tap measured the injector, not
            # a back-end: treat them as invalid.
            "injector_bound_runs": sum(r["injector_bound"] for r in runs if r["size"] == size),
            "per_run": [r for r in runs if r["size"] == size],
        })
    return rows


def run(args: argparse.Namespace) -> list[Row]:
    sizes = net.int_list(args.sizes)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vhostd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        binary = net.build_tapbound(workdir)
        runs: list[Row] = []
        with net.netns("bench-rx") as ns:
            for rnd in range(1, args.rounds + 1):
                for size in sizes:
                    for backend in net.BACKENDS:
                        progress(f"net-rx round {rnd}/{args.rounds}: {backend} {size} B")
                        r = run_backend(backend, size, binary, ns, workdir, args, rnd)
                        runs.append(r)
                        progress(f"  {r['mpps']:.3f} Mpps (offered {r['offered_mpps']:.3f}), "
                                 f"CPU {r['cpu_pct']:.0f}%")
                    progress(f"net-rx round {rnd}/{args.rounds}: {BOUND} {size} B")
                    r = run_bound(binary, size, ns, args, rnd)
                    runs.append(r)
                    progress(f"  {r['mpps']:.3f} Mpps")
        return summarize(runs, sizes)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark(
    name="net-rx",
    help="guest RX from a tap, DPDK virtio_user front-end: vhostd vs DPDK net_tap+net_vhost "
         "and the tap-read bound (Mpps, Gbit/s, CPU per frame)",
    run=run,
    add_arguments=add_arguments,
    unavailable=net.unavailable,
)
