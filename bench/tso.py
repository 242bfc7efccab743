"""tso: large frames, guest TX into a tap: 64 KiB TCP GSO frames (HOST_TSO4) on one queue.

dpdk-testpmd cannot make TSO frames by itself (txonly sends small UDP frames; the csum engine
only segments what it receives), so the front-end is bench/tsofe.c, a small vhost-user-net
driver in C (CPU 1): it negotiates VERSION_1, CSUM and HOST_TSO4 and keeps the TX ring full of
single-descriptor frames [virtio_net_hdr_v1 GSO_TCPV4, gso_size MSS, NEEDS_CSUM][Ethernet|
IPv4|TCP|45 x 1448 B], as Linux's virtio-net driver hands a TSO frame to the device.  The
back-end (CPU 0) writes them into a tap inside a namespace of our own; the rate is the tap's
rx_bytes over a fixed window after a warm-up, less 54 header bytes (Ethernet, IPv4, TCP) per
frame the tap counted: Gbit/s of TCP payload.  The frames are addressed to a MAC no one has,
so the tap's kernel side counts them and drops them at once: what is measured is the way in.

Back-ends: `vhostd net --tap` (the tap has IFF_VNET_HDR: each GSO frame goes in whole, one
writev) and the anchor, DPDK's net_vhost (tso=1, legacy-ol-flags=1, so that dequeued frames
carry TX TSO flags) bridged by testpmd io forwarding to net_tap with tcp_tso/tcp_cksum/
ipv4_cksum TX offloads.  net_tap has no vnet header: it segments each frame in software
(librte_gso) and writes every MSS-sized segment to the tap by itself, 45 writes per frame
(`tap_frames_per_frame` shows it); and it refuses segments longer than the port's MTU plus
4 bytes counting the Ethernet header, so its port gets MTU 1504 (a 1448-byte MSS makes
1502-byte segments).  Runs interleave: vhostd, dpdk, vhostd, ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from bench import PACKAGE_DIR, Benchmark, BenchError, Row, cpu_seconds, progress
from bench import _net as net
from bench._net import ANCHOR, TAP, VHOSTD, NetNs, TestPmd

HDRS = 14 + 20 + 20  # Ethernet, IPv4 and TCP headers (no options) of every frame on the tap
SOURCE = PACKAGE_DIR / "tsofe.c"
# The anchor's tap MTU: net_tap refuses a TSO segment (MSS + all headers) above MTU + 4.
ANCHOR_TAP_MTU = 1504
ANCHOR_PORT_SETUP = (
    "port stop 1",
    "port config 1 tx_offload tcp_tso on",
    "port config 1 tx_offload tcp_cksum on",
    "port config 1 tx_offload ipv4_cksum on",
    f"port config mtu 1 {ANCHOR_TAP_MTU}",
    "port start 1",
)
# What testpmd prints when it does not apply a command (it still returns to the prompt).
REFUSALS = ("fail", "invalid", "bad arguments", "error", "max frame size")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=5.0, help="measured window per run (default 5)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of traffic before the window opens (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--backends", default=f"{VHOSTD},{ANCHOR}",
                   help=f"comma-separated, from {VHOSTD}, {ANCHOR} (default both)")
    p.add_argument("--mss", type=int, default=1448, help="gso_size (default 1448)")
    p.add_argument("--segments", type=int, default=45,
                   help="MSS-sized segments per frame (default 45: 65160 B of TCP payload)")
    p.add_argument("--ring", type=int, default=256, help="TX ring size (default 256)")
    net.add_vhostd_args(p)
    net.add_contention_args(p)
    p.add_argument("--workdir", type=Path, default=None,
                   help="socket, logs and the tsofe binary (default: a temporary directory)")


def unavailable() -> str | None:
    return net.unavailable()


def build_tsofe(dest_dir: Path) -> Path:
    """Compiles bench/tsofe.c now, so a checkout needs no build step for it."""
    out = dest_dir / "tsofe"
    r = subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", "-D_GNU_SOURCE",
                        "-o", str(out), str(SOURCE)], capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"cannot compile {SOURCE.name}:\n{r.stderr}")
    return out


# --- the front-end -------------------------------------------------------------------------


class TsoFrontend:
    """One `tsofe --sync` run on CPU 1: READY, go, (the window), JSON line, stdin closed."""

    def __init__(self, binary: Path, sock: Path, seconds: float, args: argparse.Namespace | None,
                 log_path: Path, options: Sequence[str] | None = None) -> None:
        """`options` replace the TSO frame options taken from `args` (net-null's --rx etc.)."""
        if options is None:
            assert args is not None
            options = ["--mss", str(args.mss), "--segments", str(args.segments),
                       "--ring", str(args.ring)]
        argv = [str(binary), "--socket", str(sock), "--seconds", f"{seconds:g}", *options,
                "--cpu", str(net.FRONTEND_CPU), "--sync"]
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True)
        # A back-end that never answers during setup must not hang the benchmark.
        self._timer = threading.Timer(seconds + 60, self.proc.kill)
        self._timer.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def _fail(self, what: str) -> BenchError:
        self.close()
        return BenchError(f"tsofe {what} (exit {self.proc.returncode}):\n"
                          f"{self.log_path.read_text(errors='replace')[-3000:]}")

    def start(self) -> None:
        if self._line() != "READY":
            raise self._fail("did not get ready")
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        line = self._line()
        try:
            doc: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            raise self._fail(f"printed no result ({line[:200]!r})") from None
        return doc

    def close(self) -> int:
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._timer.cancel()
        self._log.close()
        return self.proc.returncode


# --- back-ends -------------------------------------------------------------------------------


def start_anchor(ns: NetNs, sock: Path, log_path: Path) -> TestPmd:
    """net_vhost (TSO offered, TX offload flags on dequeued frames) <-> net_tap with TSO."""
    pmd = TestPmd(net.BACKEND_CPU, [f"net_vhost0,iface={sock},tso=1,legacy-ol-flags=1",
                                    f"net_tap0,iface={TAP}"],
                  ["--forward-mode=io"], log_path, ns=ns, ignore_rt_signals=True)
    try:
        for line in ANCHOR_PORT_SETUP:
            out = pmd.command(line)
            if any(m in out.lower() for m in REFUSALS):
                raise BenchError(f"testpmd refused {line!r}:\n{out}")
        pmd.command("start")
    except BaseException:
        pmd.stop()
        raise
    return pmd


def start_backend(name: str, ns: NetNs, sock: Path, log_path: Path,
                  args: argparse.Namespace) -> net.Backend:
    if name == ANCHOR:
        sock.unlink(missing_ok=True)  # DPDK fails on a stale socket file
        return start_anchor(ns, sock, log_path)
    return net.start_backend(VHOSTD, ns, sock, TAP, log_path, args.vhostd_args)


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Sample:
    tap: dict[str, int]
    t: float
    be_cpu: float
    fe_cpu: float
    be_wait: float
    fe_wait: float


def sample(ns: NetNs, be: net.Backend, fe: TsoFrontend) -> Sample:
    tap, t = net.tap_counters(ns, TAP)
    return Sample(tap, t, be.cpu_seconds(), cpu_seconds(fe.pid), net.run_delay(be.pid),
                  net.run_delay(fe.pid))


def run_one(backend: str, binary: Path, ns: NetNs, workdir: Path, args: argparse.Namespace,
            rnd: int) -> Row:
    sock, tag = workdir / f"{backend}.sock", f"{backend}-r{rnd}"
    be = start_backend(backend, ns, sock, workdir / f"{tag}.log", args)
    fe: TsoFrontend | None = None
    try:
        # tsofe outlives the window by a second, so traffic never stops inside it.
        fe = TsoFrontend(binary, sock, args.warmup + args.seconds + 1, args,
                         workdir / f"tsofe-{tag}.log")
        fe.start()
        time.sleep(args.warmup)
        s0 = sample(ns, be, fe)
        time.sleep(args.seconds)
        s1 = sample(ns, be, fe)
        res = fe.result()
    finally:
        fe_rc = fe.close() if fe is not None else None
        rc = net.stop_backend(backend, be)
    if fe_rc != 0:
        raise BenchError(f"{backend}: tsofe exited {fe_rc}\n{net.log_tail(be)}")
    return result_row(backend, rnd, rc, s0, s1, res, args, net.log_tail(be))


def result_row(backend: str, rnd: int, rc: int, s0: Sample, s1: Sample, res: dict[str, Any],
               args: argparse.Namespace, log: str) -> Row:
    window = s1.t - s0.t
    frames = s1.tap["rx_packets"] - s0.tap["rx_packets"]
    payload = s1.tap["rx_bytes"] - s0.tap["rx_bytes"] - HDRS * frames
    if frames <= 0:
        raise BenchError(f"{backend}: no frames reached the tap\n{log}")
    guest_frames = payload / (args.mss * args.segments)   # what the guest sent, in its frames
    cpu = s1.be_cpu - s0.be_cpu
    return {
        "backend": backend, "round": rnd, "exit_rc": rc,
        "gbps": payload * 8 / window / 1e9,
        "guest_kfps": guest_frames / window / 1e3,
        "tap_kfps": frames / window / 1e3,
        "tap_frames_per_frame": frames / guest_frames if guest_frames else None,
        "window_s": window,
        "cpu_pct": 100 * cpu / window,
        # The back-end's CPU per 64 KiB guest frame: unlike the rate, it holds on a shared CPU.
        "cpu_us_per_frame": cpu / guest_frames * 1e6 if guest_frames else None,
        "fe_cpu_pct": 100 * (s1.fe_cpu - s0.fe_cpu) / window,
        "be_wait_pct": 100 * (s1.be_wait - s0.be_wait) / window,
        "fe_wait_pct": 100 * (s1.fe_wait - s0.fe_wait) / window,
        "tap_rx_dropped": s1.tap["rx_dropped"] - s0.tap["rx_dropped"],
        # tsofe's own count over its whole run (warm-up and tail included): a check.
        "tsofe_gbps": res["gbps"],
        "tsofe_wakeups_per_frame": res["wakeups_per_frame"],
        "tsofe_kicks_per_frame": res["kicks_per_frame"],
        "frame_len": res["frame_len"],
    }


# --- summary -------------------------------------------------------------------------------


def summarize(runs: list[Row], backends: list[str], args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    for b in backends:
        def med(key: str) -> float | None:
            return net.median_of(runs, key, b)

        rows.append({
            "backend": b,
            "frame_B": runs[0]["frame_len"] if runs else None,
            "mss": args.mss,
            "gbps": med("gbps"),
            "vs_dpdk": (net.median_or_none(net.ratio_by_round(runs, "gbps", b, ANCHOR))
                        if b != ANCHOR and ANCHOR in backends else None),
            "guest_kfps": med("guest_kfps"),
            "tap_frames_per_frame": med("tap_frames_per_frame"),
            "cpu_pct": med("cpu_pct"),
            "us_per_frame": med("cpu_us_per_frame"),
            "fe_cpu_pct": med("fe_cpu_pct"),
            "be_wait_pct": med("be_wait_pct"),
            "fe_wait_pct": med("fe_wait_pct"),
            # Runs still contended after their retries: their rates say little.
            "contended_runs": sum(net.contention(r) > args.max_wait_pct
                                  for r in runs if r["backend"] == b),
            "per_run": [r for r in runs if r["backend"] == b],
        })
    return rows


def run(args: argparse.Namespace) -> list[Row]:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or any(b not in (VHOSTD, ANCHOR) for b in backends):
        raise BenchError(f"--backends: choose from {VHOSTD}, {ANCHOR}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vhostd-bench-tso-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        binary = build_tsofe(workdir)
        runs: list[Row] = []
        with net.netns("bench-tso") as ns:
            for rnd in range(1, args.rounds + 1):
                for b in backends:
                    progress(f"tso round {rnd}/{args.rounds}: {b}")
                    runs.append(net.least_contended(
                        partial(run_one, b, binary, ns, workdir, args, rnd), args))
                    r = runs[-1]
                    progress(f"  {r['gbps']:.1f} Gbit/s TCP payload, {r['guest_kfps']:.1f}k frames/s, "
                             f"back-end CPU {r['cpu_pct']:.0f}%")
        return summarize(runs, backends, args)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark(
    name="tso",
    help="64 KiB TCP GSO frames (HOST_TSO4) from a C front-end into a tap, one queue: vhostd vs "
         "DPDK net_vhost+net_tap (Gbit/s of TCP payload, CPU per frame)",
    run=run,
    add_arguments=add_arguments,
    unavailable=unavailable,
)
