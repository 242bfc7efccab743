"""guest-fio: fio 4k random reads (libaio, iodepth 32, direct) inside a QEMU TCG guest, on one
disk image served by vhostd and by qemu-storage-daemon (the anchor), runs interleaved.

Under TCG the guest itself bounds IOPS (~4k for any back-end), so the IOPS ratio mostly checks
that vhostd is not the bottleneck; the back-end's CPU seconds per million requests is the
number that tells the back-ends apart.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench import REPO, Benchmark, BenchError, Process, Row, progress

# The guest harness lives with the tests, which import it the same way (tests/ on sys.path).
sys.path.insert(0, str(REPO / "tests"))
import guestvm  # noqa: E402

ANCHOR = "qsd"
GO, DONE = "BENCH-FIO-GO", "BENCH-FIO-DONE"
JSON_BEGIN, JSON_END = "BENCH-FIO-JSON-BEGIN", "BENCH-FIO-JSON-END"


def _vhostd(image: Path, sock: Path) -> list[str]:
    # The default log level, as a user runs it (the tests' --log-level debug is not measured).
    return [sys.executable, "-m", "vhostd", "blk", "--socket-path", str(sock), "--file", str(image)]


def _qsd(file_options: str) -> Callable[[Path, Path], list[str]]:
    def argv(image: Path, sock: Path) -> list[str]:
        return [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=f,filename={image}{file_options}",
            "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
                        "writable=on,num-queues=1",
        ]
    return argv


# name -> argv(image, socket).  QEMU 7.2's qsd accepts aio=io_uring on a buffered file.
BACKENDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "vhostd": _vhostd,
    "qsd": _qsd(""),
    "qsd-io_uring": _qsd(",aio=io_uring"),
    "qsd-direct-native": _qsd(",cache.direct=on,aio=native"),
}
DEFAULT_BACKENDS = ("vhostd", "qsd", "qsd-io_uring")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=int, default=20, help="fio runtime per run (default 20)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--image-mib", type=int, default=256, help="disk image size (default 256)")
    p.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                   help=f"comma-separated, run in this order each round; from {', '.join(BACKENDS)} "
                        f"(default {','.join(DEFAULT_BACKENDS)}); ratios are against {ANCHOR}")
    p.add_argument("--iodepth", type=int, default=32)
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the image, sockets and logs go (default: a temporary directory, removed)")


def unavailable() -> str | None:
    why = guestvm.unavailable_reason()
    if why is None and shutil.which("qemu-storage-daemon") is None:
        why = "qemu-storage-daemon not found (install qemu-system-common)"
    return why


def guest_script(seconds: int, iodepth: int) -> str:
    # The markers let the host sample the back-end's CPU time around fio alone (not the boot);
    # fio writes its JSON to a file so warnings on stderr cannot corrupt it.
    return f"""
echo {GO}
fio --name=randread --filename=/dev/vda --rw=randread --bs=4k --iodepth={iodepth} \\
    --ioengine=libaio --direct=1 --time_based --runtime={seconds} \\
    --output-format=json --output=/tmp/fio.json
rc=$?
echo {DONE}
echo {JSON_BEGIN}
cat /tmp/fio.json
echo {JSON_END}
exit $rc
"""


def make_image(path: Path, mib: int) -> None:
    """Random data in every block, so reads hit allocated extents, not holes."""
    subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={mib}",
                    "conv=fsync", "status=none"], check=True)


def parse_fio(output: str) -> dict[str, Any]:
    start, end = output.find(JSON_BEGIN), output.find(JSON_END)
    if start < 0 or end < 0:
        raise BenchError(f"no fio JSON in the guest output:\n{output[-4000:]}")
    doc = json.loads(output[start + len(JSON_BEGIN):end])
    read = doc["jobs"][0]["read"]
    clat = read["clat_ns"]
    return {
        "iops": float(read["iops"]),
        "requests": int(read["total_ios"]),
        "fio_runtime_s": read["runtime"] / 1000,
        "clat_mean_us": clat["mean"] / 1000,
        "clat_p99_us": clat.get("percentile", {}).get("99.000000", 0) / 1000,
    }


def run_once(backend: str, image: Path, workdir: Path, args: argparse.Namespace, rnd: int) -> Row:
    sock = workdir / f"{backend}.sock"
    sock.unlink(missing_ok=True)  # a stale socket from an earlier run
    log = workdir / f"{backend}-r{rnd}.log"
    with Process(BACKENDS[backend](image, sock), log, socket=sock) as proc:
        guest = guestvm.start_guest(guest_script(args.seconds, args.iodepth),
                                    guestvm.vhost_user_blk_args(sock), timeout=args.seconds + 180)
        with guest:
            if not guest.wait_for(GO, 120):
                raise BenchError(f"{backend}: guest never started fio\n{guest.result(5).describe()}")
            cpu0, t0 = proc.cpu_seconds(), time.monotonic()
            if not guest.wait_for(DONE, args.seconds + 120):
                raise BenchError(f"{backend}: fio did not finish\n{guest.result(5).describe()}\n"
                                 f"--- {backend} log ---\n{proc.log()}")
            cpu1, t1 = proc.cpu_seconds(), time.monotonic()
            result = guest.result()
        if result.rc != 0:
            raise BenchError(f"{backend}: guest script failed\n{result.describe()}\n"
                             f"--- {backend} log ---\n{proc.log()}")
    fio = parse_fio(result.output)
    cpu = cpu1 - cpu0
    return {
        "backend": backend, "round": rnd, **fio,
        "cpu_s": cpu,
        "cpu_util_pct": 100 * cpu / fio["fio_runtime_s"],
        "cpu_s_per_mio": cpu / (fio["requests"] / 1e6),
        "window_s": t1 - t0,
        "boot_s": result.boot_seconds,
    }


def _same_round_ratios(runs: list[Row], backend: str, key: str) -> list[float]:
    anchor = {r["round"]: r[key] for r in runs if r["backend"] == ANCHOR}
    return [r[key] / anchor[r["round"]] for r in runs
            if r["backend"] == backend and anchor.get(r["round"])]


def summarize(runs: list[Row], backends: list[str]) -> list[Row]:
    rows: list[Row] = []
    for b in backends:
        mine = [r for r in runs if r["backend"] == b]
        iops_ratio = _same_round_ratios(runs, b, "iops")
        cpu_ratio = _same_round_ratios(runs, b, "cpu_s_per_mio")
        rows.append({
            "backend": b,
            "runs": len(mine),
            "iops_median": statistics.median(r["iops"] for r in mine),
            "iops_min": min(r["iops"] for r in mine),
            "iops_max": max(r["iops"] for r in mine),
            f"iops_vs_{ANCHOR}": statistics.median(iops_ratio) if iops_ratio else None,
            "clat_p99_us": statistics.median(r["clat_p99_us"] for r in mine),
            "cpu_util_pct": statistics.median(r["cpu_util_pct"] for r in mine),
            "cpu_s_per_mio": statistics.median(r["cpu_s_per_mio"] for r in mine),
            f"cpu_per_mio_vs_{ANCHOR}": statistics.median(cpu_ratio) if cpu_ratio else None,
            "per_run": mine,
        })
    return rows


def _backends(spec: str) -> list[str]:
    names = [b.strip() for b in spec.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise BenchError(f"unknown back-ends {unknown}; choose from {', '.join(BACKENDS)}")
    return names


def run(args: argparse.Namespace) -> list[Row]:
    backends = _backends(args.backends)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vhostd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        image = workdir / "disk.img"
        make_image(image, args.image_mib)
        guestvm.build_initramfs()  # once, before any timing
        runs: list[Row] = []
        for rnd in range(1, args.rounds + 1):
            for b in backends:
                progress(f"guest-fio round {rnd}/{args.rounds}: {b}")
                runs.append(run_once(b, image, workdir, args, rnd))
                progress(f"  {runs[-1]['iops']:.0f} IOPS, {runs[-1]['cpu_s']:.2f} CPU s")
        return summarize(runs, backends)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark(
    name="guest-fio",
    help="fio 4k randread QD32 in a TCG guest: vhostd vs qemu-storage-daemon (IOPS, CPU/MIO)",
    run=run,
    add_arguments=add_arguments,
    unavailable=unavailable,
)
