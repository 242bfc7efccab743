"""net-null: the descriptor ceiling, no tap: how many 64 B frames per second a back-end moves
through a virtio ring when the frames go nowhere.

Back-ends (CPU 0): `vhostd net --backend null` (TX frames counted and discarded, RX buffers
filled with a generated 60-byte frame), with its default interrupt-driven workers and with
`--poll-us` busy-polling, against the anchor: DPDK's own vhost-user back-end
(`dpdk-testpmd --vdev net_vhost0`), which busy-polls, in rxonly (guest TX) or txonly (guest
RX, 60-byte frames) forwarding.  Front-end (CPU 1): DPDK's virtio_user in testpmd, txonly for
guest TX and rxonly for guest RX.  The rate is the front-end's port counter (TX-packets the
ring accepted, RX-packets it delivered) over a fixed window after a warm-up; the same counter
for every back-end.  No frame leaves the two processes, so no namespace is needed.

The front-end busy-polls too and costs tens of ns per frame, so a fast back-end can be limited
by it: `ring_full_pct` (guest TX: share of the front-end's sends a full ring refused) near 0
means the front-end, not the back-end, set the pace.  Runs interleave per round.

Dirty-page logging (live migration): testpmd's virtio_user cannot turn it on, so two more
back-end names (not run by default) drive `vhostd net --backend null` with bench/tsofe.c
instead, an interrupt-driven C front-end like a guest's driver (plain 60-byte frames for guest
TX, 2 KiB RX buffers for guest RX): `vhostd-cfe` and `vhostd-cfe-log`, the latter with
`tsofe --log` (VHOST_F_LOG_ALL, LOG_SHMFD, a bitmap synced every 100 ms as QEMU does while
migrating).  Their rate is vhostd's own frame counter over the window (the same counter as
`vhostd_counted_mpps` of the testpmd runs), and `log_vs_nolog` compares the two same-round.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench import Benchmark, BenchError, Process, Row, cpu_seconds, progress
from bench import _net as net
from bench._net import ANCHOR, TestPmd
from bench.tso import TsoFrontend, build_tsofe
from vhostd import control as ctl

PAYLOAD = 60  # a 64 B Ethernet frame without its FCS


@dataclass(frozen=True)
class Direction:
    name: str
    frontend_mode: str  # testpmd forwarding mode on the virtio_user side
    anchor_mode: str    # ... and on the DPDK vhost side


DIRECTIONS = {d.name: d for d in (
    Direction("tx", "txonly", "rxonly"),   # guest TX: the front-end sends, the back-end eats
    Direction("rx", "rxonly", "txonly"),   # guest RX: the back-end fills, the front-end eats
)}

# Back-end name -> extra `vhostd net` options; ANCHOR is DPDK.
VHOSTD_VARIANTS = {
    "vhostd": [],
    "vhostd-poll50": ["--poll-us", "50"],
    "vhostd-poll200": ["--poll-us", "200"],
    # QoS limits far above what the machine does (the gate's cost, against "vhostd")
    "vhostd-limited": ["--limit", "tx_packets_sec=1000000000", "--limit", "tx_bytes_sec=1000000000000",
                       "--limit", "rx_packets_sec=1000000000", "--limit", "rx_bytes_sec=1000000000000"],
    "vhostd-packed": [],
}
# vhostd-limited against vhostd, same round: limited_vs_unlimited (the goal: >= 0.97).
LIMITED_PAIR = ("vhostd-limited", "vhostd")
# Back-ends whose front-end lays out packed rings (virtio_user packed_vq=1); the
# anchor's packed twin is DPDK net_vhost with the same front-end.  packed_vs_split:
# vhostd-packed against vhostd, vs_dpdk_packed: against dpdk-packed, same round.
PACKED_ANCHOR = "dpdk-packed"
PACKED = {"vhostd-packed", PACKED_ANCHOR}
PACKED_VDEV = ",packed_vq=1"
DEFAULT_BACKENDS = ("vhostd", "vhostd-poll50", "vhostd-poll200", ANCHOR)
# Back-end name -> extra tsofe options: vhostd's default workers driven by bench/tsofe.c
# (which, unlike testpmd, can turn dirty-page logging on).  Not run by default.
# `-regions1` / `-regions`: tsofe --regions 1 / --regions N (--regions, default 64): the frame
# buffers round-robin over N guest RAM regions sent with ADD_MEM_REG (regionsN_vs_1).
CFE_VARIANTS = {"vhostd-cfe": [], "vhostd-cfe-log": ["--log"],
                "vhostd-cfe-regions1": ["--regions", "1"], "vhostd-cfe-regions": ["--regions", "N"]}
LOG_PAIR = ("vhostd-cfe-log", "vhostd-cfe")
REGIONS_PAIR = ("vhostd-cfe-regions", "vhostd-cfe-regions1")


def cfe_options(backend: str, args: argparse.Namespace) -> list[str]:
    return [str(args.regions) if o == "N" else o for o in CFE_VARIANTS[backend]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=5.0, help="measured window per run (default 5)")
    p.add_argument("--warmup", type=float, default=1.0,
                   help="seconds of traffic before the window opens (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                   help=f"comma-separated, from {', '.join([*VHOSTD_VARIANTS, ANCHOR, PACKED_ANCHOR, *CFE_VARIANTS])} "
                        f"(default {','.join(DEFAULT_BACKENDS)}); ratios are against {ANCHOR}, "
                        f"{LOG_PAIR[0]} against {LOG_PAIR[1]} (log_vs_nolog), "
                        f"{REGIONS_PAIR[0]} against {REGIONS_PAIR[1]} (regionsN_vs_1)")
    p.add_argument("--directions", default="tx,rx", help="tx (guest TX), rx (guest RX) or both")
    p.add_argument("--queue-size", type=int, default=1024,
                   help="virtio_user ring size (default 1024)")
    p.add_argument("--cfe-frame", type=int, default=PAYLOAD,
                   help=f"guest TX frame size of the vhostd-cfe back-ends (tsofe --frame, default "
                        f"{PAYLOAD}); with 1514 the buffers are 1536 bytes apart, so 1 or N regions "
                        f"touch the same number of pages")
    p.add_argument("--regions", type=int, default=64,
                   help=f"guest RAM regions of {REGIONS_PAIR[0]} (tsofe --regions, default 64)")
    net.add_vhostd_args(p)
    net.add_contention_args(p)
    p.add_argument("--workdir", type=Path, default=None,
                   help="sockets and logs (default: a temporary directory, removed)")


def unavailable() -> str | None:
    if shutil.which(net.TESTPMD) is None:
        return f"{net.TESTPMD} not found (apt-get install dpdk)"
    if shutil.which("taskset") is None:
        return "taskset not found (util-linux)"
    return None


# --- back-ends ---------------------------------------------------------------------------------


def start_vhostd(sock: Path, control: Path, log: Path, extra: list[str]) -> Process:
    # The default log level, as a user runs it; the control socket for its own counters.
    argv = [sys.executable, "-m", "vhostd", "net", "--backend", "null", "--socket-path",
            str(sock), "--control-socket", str(control), *extra]
    return Process(net.pinned(net.BACKEND_CPU, argv), log, socket=sock)


def start_anchor(sock: Path, direction: Direction, log: Path) -> TestPmd:
    pmd = TestPmd(net.BACKEND_CPU, [f"net_vhost0,iface={sock}"],
                  [f"--forward-mode={direction.anchor_mode}", f"--txpkts={PAYLOAD}"], log)
    try:
        pmd.command("start")
    except BaseException:
        pmd.stop()
        raise
    return pmd


def start_backend(name: str, sock: Path, control: Path, direction: Direction, log: Path,
                  args: argparse.Namespace) -> net.Backend:
    sock.unlink(missing_ok=True)  # DPDK fails on a stale socket file
    if name in (ANCHOR, PACKED_ANCHOR):
        return start_anchor(sock, direction, log)
    return start_vhostd(sock, control, log, [*VHOSTD_VARIANTS[name], *args.vhostd_args])


def vhostd_counters(control: Path, direction: Direction) -> dict[str, int] | None:
    """vhostd's own counts (control socket): frames, to check the front-end's, and the ring's
    kicks (wake-ups by the front-end), calls (interrupts sent) and batches.  None if unreadable."""
    try:
        status: dict[str, Any] = ctl.request(control, "status", timeout=5)["status"]
    except (ctl.ControlError, OSError):
        return None
    dev = status["devices"][0]
    ring_index = 1 if direction.name == "tx" else 0   # queue pair 0: RX ring 0, TX ring 1
    ring = next((r for r in dev.get("rings", []) if r["index"] == ring_index), None)
    if ring is None:
        return None
    key = "tx_frames" if direction.name == "tx" else "rx_frames"
    return {"frames": sum(int(p[key]) for p in dev["device"]["queue_pairs"]),
            "kicks": int(ring["kicks"]), "calls": int(ring["calls"]),
            "batches": int(ring["batches"])}


# --- one run -----------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    frames: int       # front-end: accepted into the TX ring / delivered from the RX ring
    refused: int      # front-end TX only: sends a full ring refused
    be_cpu: float
    be_wait: float
    fe_wait: float
    vhostd: dict[str, int] | None


def sample(fe: TestPmd, be: net.Backend, direction: Direction, control: Path,
           is_vhostd: bool) -> Sample:
    if direction.name == "tx":
        f = fe.fwd_stats(0)
        frames, refused = f["tx_packets"], f["tx_dropped"]
    else:
        frames, refused = fe.port_stats(0)["rx_packets"], 0
    t = time.monotonic()
    return Sample(t, frames, refused, be.cpu_seconds(), net.run_delay(be.pid),
                  net.run_delay(fe.pid), vhostd_counters(control, direction) if is_vhostd else None)


def run_one(backend: str, direction: Direction, workdir: Path, args: argparse.Namespace,
            rnd: int) -> Row:
    tag = f"{backend}-{direction.name}-r{rnd}"
    sock, control = workdir / f"{backend}.sock", workdir / f"{backend}.control"
    be = start_backend(backend, sock, control, direction, workdir / f"{tag}.log", args)
    is_vhostd = backend not in (ANCHOR, PACKED_ANCHOR)
    try:
        with net.frontend(sock, direction.frontend_mode, workdir / f"frontend-{tag}.log",
                          args.queue_size, [f"--txpkts={PAYLOAD}"],
                          vdev_extra=PACKED_VDEV if backend in PACKED else "") as fe:
            fe.command("start")
            time.sleep(args.warmup)
            s0 = sample(fe, be, direction, control, is_vhostd)
            time.sleep(args.seconds)
            s1 = sample(fe, be, direction, control, is_vhostd)
            fe.command("stop")
    finally:
        rc = net.stop_backend(backend, be)
    return result_row(backend, direction, rnd, rc, s0, s1, net.log_tail(be))


def result_row(backend: str, direction: Direction, rnd: int, rc: int, s0: Sample, s1: Sample,
               log: str) -> Row:
    frames, window = s1.frames - s0.frames, s1.t - s0.t
    if frames <= 0:
        raise BenchError(f"{backend} {direction.name}: no frames moved\n{log}")
    cpu = s1.be_cpu - s0.be_cpu
    refused = s1.refused - s0.refused
    own = ({k: s1.vhostd[k] - s0.vhostd[k] for k in s0.vhostd}
           if s0.vhostd is not None and s1.vhostd is not None else None)
    return {
        "backend": backend, "direction": direction.name, "round": rnd, "exit_rc": rc,
        "mpps": frames / window / 1e6,
        "frames": frames, "window_s": window,
        "cpu_pct": 100 * cpu / window,
        "cpu_ns_per_frame": cpu / frames * 1e9,
        "be_wait_pct": 100 * (s1.be_wait - s0.be_wait) / window,
        "fe_wait_pct": 100 * (s1.fe_wait - s0.fe_wait) / window,
        "ring_full_pct": 100 * refused / max(1, frames + refused) if direction.name == "tx" else None,
        # vhostd's own counter over (nearly) the same window: a check on the front-end's.
        "vhostd_counted_mpps": None if own is None else own["frames"] / window / 1e6,
        # Per 1000 frames: wake-ups by a kick, interrupts sent, batches (vhostd only).
        "kicks_per_kframe": None if own is None else 1000 * own["kicks"] / frames,
        "calls_per_kframe": None if own is None else 1000 * own["calls"] / frames,
        "frames_per_batch": None if not own or not own["batches"] else own["frames"] / own["batches"],
        "offered_mpps": (frames + refused) / window / 1e6 if direction.name == "tx" else None,
    }


def run_one_cfe(backend: str, direction: Direction, workdir: Path, args: argparse.Namespace,
                rnd: int, tsofe: Path) -> Row:
    """vhostd --backend null driven by tsofe: the window is opened after --warmup and read from
    vhostd's own counters (tsofe runs a second longer, so traffic never stops inside it)."""
    tag = f"{backend}-{direction.name}-r{rnd}"
    sock, control = workdir / f"{backend}.sock", workdir / f"{backend}.control"
    sock.unlink(missing_ok=True)
    be = start_vhostd(sock, control, workdir / f"{tag}.log", list(args.vhostd_args))
    options = [*(["--rx"] if direction.name == "rx" else ["--frame", str(args.cfe_frame)]),
               "--ring", str(args.queue_size), *cfe_options(backend, args)]
    try:
        fe = TsoFrontend(tsofe, sock, args.warmup + args.seconds + 1, None,
                         workdir / f"tsofe-{tag}.log", options)
        try:
            fe.start()
            time.sleep(args.warmup)

            def snap() -> tuple[float, float, float, float, dict[str, int] | None]:
                return (time.monotonic(), be.cpu_seconds(), net.run_delay(be.pid),
                        net.run_delay(fe.pid), vhostd_counters(control, direction))
            t0, cpu0, bw0, fw0, c0 = snap()
            time.sleep(args.seconds)
            t1, cpu1, bw1, fw1, c1 = snap()
            res = fe.result()
            fe_cpu = cpu_seconds(fe.pid)
        finally:
            fe_rc = fe.close()
    finally:
        rc = net.stop_backend(backend, be)
    if fe_rc != 0 or c0 is None or c1 is None:
        raise BenchError(f"{tag}: tsofe exited {fe_rc}, counters {c0} {c1}\n{net.log_tail(be)}")
    if "--log" in options and (not res.get("logged_pages") or res.get("logged_pages_outside_ram")):
        raise BenchError(f"{tag}: tsofe --log saw {res.get('logged_pages')} pages logged, "
                         f"{res.get('logged_pages_outside_ram')} outside guest RAM")
    own = {k: c1[k] - c0[k] for k in c0}
    frames, window, cpu = own["frames"], t1 - t0, cpu1 - cpu0
    if frames <= 0:
        raise BenchError(f"{tag}: no frames moved\n{net.log_tail(be)}")
    return {
        "backend": backend, "direction": direction.name, "round": rnd, "exit_rc": rc,
        "mpps": frames / window / 1e6,
        "frames": frames, "window_s": window,
        "cpu_pct": 100 * cpu / window,
        "cpu_ns_per_frame": cpu / frames * 1e9,
        "be_wait_pct": 100 * (bw1 - bw0) / window,
        "fe_wait_pct": 100 * (fw1 - fw0) / window,
        "ring_full_pct": None,
        "vhostd_counted_mpps": frames / window / 1e6,
        "kicks_per_kframe": 1000 * own["kicks"] / frames,
        "calls_per_kframe": 1000 * own["calls"] / frames,
        "frames_per_batch": own["frames"] / own["batches"] if own["batches"] else None,
        # tsofe's own rate over its whole run (warm-up and tail included): a check.
        "tsofe_mpps": res["mpps"],
        "tsofe_cpu_s": fe_cpu,
        "logged_pages": res.get("logged_pages"),
        "log_syncs": res.get("log_syncs"),
        "regions": res.get("regions"), "mem_setup": res.get("mem_setup"),
        # Over tsofe's whole run, summed over its 100 ms syncs.
        "logged_pages_per_s": (res["logged_pages"] / res["seconds"]
                               if res.get("logged_pages") is not None else None),
    }


# --- summary -----------------------------------------------------------------------------------


def summarize(runs: list[Row], backends: list[str], directions: list[str],
              max_wait: float, regions: int = 64) -> list[Row]:
    rows: list[Row] = []
    for d in directions:
        for b in backends:
            mine = [r for r in runs if r["backend"] == b and r["direction"] == d]

            def med(key: str) -> float | None:
                return net.median_of(runs, key, b, direction=d)

            ratio = (net.median_or_none(net.ratio_by_round(runs, "mpps", b, ANCHOR, direction=d))
                     if ANCHOR in backends and b not in (ANCHOR, PACKED_ANCHOR) else None)
            log_cols: Row = {}
            if b == "vhostd-packed":
                for col, other in (("packed_vs_split", "vhostd"), ("vs_dpdk_packed", PACKED_ANCHOR)):
                    if other in backends:
                        log_cols[col] = net.median_or_none(net.ratio_by_round(runs, "mpps", b, other, direction=d))
                        log_cols["ns_" + col] = net.median_or_none(net.ratio_by_round(
                            runs, "cpu_ns_per_frame", b, other, direction=d))
            if b == LIMITED_PAIR[0] and LIMITED_PAIR[1] in backends:
                log_cols |= {
                    "limited_vs_unlimited": net.median_or_none(net.ratio_by_round(
                        runs, "mpps", b, LIMITED_PAIR[1], direction=d)),
                    "ns_limited_vs_unlimited": net.median_or_none(net.ratio_by_round(
                        runs, "cpu_ns_per_frame", b, LIMITED_PAIR[1], direction=d)),
                }
            if all(n in backends for n in LOG_PAIR):
                on = b == LOG_PAIR[0]
                log_cols = {
                    "log_vs_nolog": net.median_or_none(net.ratio_by_round(
                        runs, "mpps", b, LOG_PAIR[1], direction=d)) if on else None,
                    "ns_log_vs_nolog": net.median_or_none(net.ratio_by_round(
                        runs, "cpu_ns_per_frame", b, LOG_PAIR[1], direction=d)) if on else None,
                    "logged_pages_per_s": med("logged_pages_per_s"),
                }
            if all(n in backends for n in REGIONS_PAIR) and b == REGIONS_PAIR[0]:
                log_cols |= {
                    f"regions{regions}_vs_1": net.median_or_none(net.ratio_by_round(
                        runs, "mpps", b, REGIONS_PAIR[1], direction=d)),
                    f"ns_regions{regions}_vs_1": net.median_or_none(net.ratio_by_round(
                        runs, "cpu_ns_per_frame", b, REGIONS_PAIR[1], direction=d)),
                }
            rows.append({
                "direction": "guest TX" if d == "tx" else "guest RX",
                "backend": b,
                "mpps": med("mpps"),
                "vs_dpdk": ratio,
                "cpu_pct": med("cpu_pct"),
                "ns_per_frame": med("cpu_ns_per_frame"),
                "ring_full_pct": med("ring_full_pct"),
                "kicks_per_kframe": med("kicks_per_kframe"),
                "frames_per_batch": med("frames_per_batch"),
                "be_wait_pct": med("be_wait_pct"),
                "fe_wait_pct": med("fe_wait_pct"),
                **log_cols,
                # Runs still contended after their retries: their rates say little.
                "contended_runs": sum(net.contention(r) > max_wait for r in mine),
                "per_run": mine,
            })
    return rows


def names(spec: str, known: list[str], what: str) -> list[str]:
    chosen = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in chosen if n not in known]
    if bad or not chosen:
        raise BenchError(f"unknown {what} {bad}; choose from {', '.join(known)}")
    return chosen


def run(args: argparse.Namespace) -> list[Row]:
    backends = names(args.backends, [*VHOSTD_VARIANTS, ANCHOR, PACKED_ANCHOR, *CFE_VARIANTS], "back-ends")
    directions = names(args.directions, list(DIRECTIONS), "directions")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vhostd-bench-null-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs: list[Row] = []
    try:
        tsofe = build_tsofe(workdir) if any(b in CFE_VARIANTS for b in backends) else None
        for rnd in range(1, args.rounds + 1):
            for d in directions:
                for b in backends:
                    progress(f"net-null round {rnd}/{args.rounds}: guest {d.upper()} {b}")
                    one = (partial(run_one_cfe, b, DIRECTIONS[d], workdir, args, rnd, tsofe)
                           if tsofe is not None and b in CFE_VARIANTS else
                           partial(run_one, b, DIRECTIONS[d], workdir, args, rnd))
                    runs.append(net.least_contended(one, args))
                    r = runs[-1]
                    progress(f"  {r['mpps']:.3f} Mpps, back-end CPU {r['cpu_pct']:.0f}%"
                             + (f", vhostd counted {r['vhostd_counted_mpps']:.3f}"
                                if r["vhostd_counted_mpps"] is not None else ""))
        return summarize(runs, backends, directions, args.max_wait_pct, args.regions)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark(
    name="net-null",
    help="descriptor ceiling without a tap: vhostd --backend null (interrupt and poll mode) vs "
         "DPDK net_vhost rxonly/txonly, 64 B, DPDK virtio_user front-end (Mpps, CPU)",
    run=run,
    add_arguments=add_arguments,
    unavailable=unavailable,
)
