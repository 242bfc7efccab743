"""guest-iperf: iperf3 in a QEMU TCG guest (tests/guestvm.py) to a server on the host side of a
tap, through `vhostd net` and through QEMU's own tap back-end (the anchor), runs interleaved.

The tap is persistent and made once, inside a namespace of our own, with the server's address
(so one iperf3 server serves every run); each back-end attaches to it in turn.  QEMU runs
inside the namespace too: for `-netdev tap` it opens the tap by name, which only resolves in
the tap's namespace.  Both guests use `vectors=0` (INTx): QEMU 7.2 under TCG crashes with
vhost-user-net and MSI-X, and the anchor gets the same interrupt path so that only the
back-end differs.  Nothing is pinned: the TCG vCPU, not the back-end, bounds these numbers
(PEERS.md: ~0.6-0.9 Gbit/s through QEMU's tap), so they check that vhostd keeps up with a
real driver (TSO, checksum offload, mergeable buffers), not its per-frame cost.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from bench import REPO, Benchmark, BenchError, Process, Row, progress
from bench import _net as net
from bench._net import NetNs

sys.path.insert(0, str(REPO / "tests"))
import guestvm  # noqa: E402

VHOSTD, ANCHOR = "vhostd", "qemu"
BACKENDS = (VHOSTD, ANCHOR)
TAP = "nbgtap0"
HOST_IP, GUEST_IP = "10.98.0.1", "10.98.0.2"
TX, RX, END = "BENCH-IPERF-TX", "BENCH-IPERF-RX", "BENCH-IPERF-END"
DIRECTIONS = {TX: "guest->host", RX: "host->guest"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=int, default=5,
                   help="iperf3 time per direction (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--smp", type=int, default=1, help="guest vCPUs (default 1)")
    net.add_vhostd_args(p)
    p.add_argument("--workdir", type=Path, default=None,
                   help="socket and logs (default: a temporary directory, removed)")


def unavailable() -> str | None:
    why = guestvm.unavailable_reason() or net.netns_available()
    if why is None and shutil.which("iperf3") is None:
        why = "iperf3 not found"
    return why


def guest_script(seconds: int) -> str:
    # Ping first: the link is up only once the back-end has the rings, and an iperf3 started
    # before that would measure its connect timeout.
    return f"""
set -e
ip addr add {GUEST_IP}/24 dev eth0
ip link set eth0 up
i=0
until ping -c 1 -W 1 {HOST_IP} >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -lt 30 ] || {{ echo "no answer from {HOST_IP}"; exit 3; }}
done
echo {TX}
iperf3 -c {HOST_IP} -t {seconds} -f m
echo {RX}
iperf3 -c {HOST_IP} -t {seconds} -f m -R
echo {END}
"""


def parse_iperf(output: str) -> dict[str, float]:
    """Receiver-side Gbit/s of each direction (the receiver counts what actually arrived)."""
    found: dict[str, float] = {}
    for marker, end in ((TX, RX), (RX, END)):
        section = output[output.find(marker):output.find(end)]
        m = re.search(r"([\d.]+) Mbits/sec\s+receiver", section)
        if marker not in output or not m:
            raise BenchError(f"no iperf3 result after {marker} in the guest output:\n"
                             f"{output[-3000:]}")
        found[DIRECTIONS[marker]] = float(m[1]) / 1000
    return found


def make_tap(ns: NetNs) -> None:
    """A persistent single-queue tap with the server's address, up (its carrier comes and goes
    with whoever attaches)."""
    ns.run(["ip", "tuntap", "add", "dev", TAP, "mode", "tap"])
    ns.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP])
    ns.run(["ip", "link", "set", TAP, "up"])


def start_guest_in(ns: NetNs, script: str, qemu_args: Sequence[str], timeout: float,
                   smp: int) -> guestvm.Guest:
    """guestvm.start_guest, with QEMU started inside the namespace."""
    initrd = guestvm.build_initramfs()
    workdir = Path(tempfile.mkdtemp(prefix="vhostd-guest-"))
    script_file = workdir / "script.sh"
    script_file.write_text(script)
    cmd = guestvm.guest_command(guestvm.guest_kernel(), initrd, script_file, qemu_args, smp=smp)
    return guestvm.Guest(ns.cmd(cmd), workdir, timeout)


def vhostd_args(sock: Path) -> list[str]:
    return ["-chardev", f"socket,id=c0,path={sock}",
            "-netdev", "vhost-user,id=n0,chardev=c0,queues=1",
            "-device", "virtio-net-pci,netdev=n0,vectors=0"]


def qemu_tap_args() -> list[str]:
    return ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
            "-device", "virtio-net-pci,netdev=n0,vectors=0"]


def run_once(backend: str, ns: NetNs, workdir: Path, args: argparse.Namespace, rnd: int) -> Row:
    timeout = 2 * args.seconds + 180
    vhostd: Process | None = None
    try:
        if backend == VHOSTD:
            sock = workdir / "vhostd.sock"
            sock.unlink(missing_ok=True)
            vhostd = Process(ns.cmd(net.vhostd_argv(sock, TAP, args.vhostd_args)),
                             workdir / f"vhostd-r{rnd}.log")
            net.wait_listening(vhostd, sock)
            qemu_args = vhostd_args(sock)
        else:
            qemu_args = qemu_tap_args()
        with start_guest_in(ns, guest_script(args.seconds), qemu_args, timeout, args.smp) as guest:
            if not guest.wait_for(TX, 120):
                raise BenchError(f"{backend}: guest never reached iperf3\n"
                                 f"{guest.result(5).describe()}")
            cpu0 = vhostd.cpu_seconds() if vhostd else None
            if not guest.wait_for(END, 2 * args.seconds + 60):
                raise BenchError(f"{backend}: iperf3 did not finish\n{guest.result(5).describe()}"
                                 + (f"\n--- vhostd ---\n{vhostd.log()}" if vhostd else ""))
            cpu1 = vhostd.cpu_seconds() if vhostd else None
            result = guest.result()
        if result.rc != 0:
            raise BenchError(f"{backend}: guest script failed\n{result.describe()}")
    finally:
        if vhostd is not None:
            net.stop_backend(VHOSTD, vhostd)
    gbps = parse_iperf(result.output)
    return {
        "backend": backend, "round": rnd, **gbps,
        "backend_cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
        "boot_s": result.boot_seconds,
    }


def summarize(runs: list[Row]) -> list[Row]:
    rows: list[Row] = []
    for direction in DIRECTIONS.values():
        ratios = net.ratio_by_round(runs, direction, VHOSTD, ANCHOR)
        rows.append({
            "direction": direction,
            "vhostd_gbps": net.median_of(runs, direction, VHOSTD),
            "qemu_gbps": net.median_of(runs, direction, ANCHOR),
            "vhostd_vs_qemu": statistics.median(ratios) if ratios else None,
            "vhostd_min": min(r[direction] for r in runs if r["backend"] == VHOSTD),
            "vhostd_max": max(r[direction] for r in runs if r["backend"] == VHOSTD),
            "qemu_min": min(r[direction] for r in runs if r["backend"] == ANCHOR),
            "qemu_max": max(r[direction] for r in runs if r["backend"] == ANCHOR),
            "per_run": runs,
        })
    return rows


def run(args: argparse.Namespace) -> list[Row]:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vhostd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        guestvm.build_initramfs()  # once, before any timing
        runs: list[Row] = []
        with net.netns("bench-iperf") as ns:
            make_tap(ns)
            ns.popen(["iperf3", "-s", "-B", HOST_IP], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)  # killed when the namespace goes
            for rnd in range(1, args.rounds + 1):
                for backend in BACKENDS:
                    progress(f"guest-iperf round {rnd}/{args.rounds}: {backend}")
                    runs.append(run_once(backend, ns, workdir, args, rnd))
                    progress("  " + ", ".join(f"{d} {runs[-1][d]:.3f} Gbit/s"
                                              for d in DIRECTIONS.values()))
        return summarize(runs)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark(
    name="guest-iperf",
    help="iperf3 both ways in a TCG guest: vhostd net vs QEMU's own tap (Gbit/s)",
    run=run,
    add_arguments=add_arguments,
    unavailable=unavailable,
)
