"""blk-backend: vhost-user-blk back-ends driven by a C front-end (bench/blkfe.c), no VM.

The same image file is served in turn by `vhostd blk` and by qemu-storage-daemon (the anchor
`qsd`, and `qsd-io_uring` with aio=io_uring on its file blockdev); blkfe keeps QD requests in
flight per queue, interrupt-driven like a guest, and reports IOPS and latency percentiles.
The back-end's CPU time (utime+stime of its process, all threads) is sampled around the
measured window only: blkfe waits on stdin before and after it (--sync).

Placement on a 2-core machine: with one queue the back-end is pinned to CPU 0 (taskset) and
blkfe to CPU 1, so each side has one core.  With two queues the back-end may use both CPUs
and blkfe's queue thread i is pinned to CPU i: the whole machine is shared as a 2-vCPU guest
and its host would share it, so IOPS says how well back-end + driver use two cores together
and CPU seconds per million requests says what the back-end's share cost.

Images: one on tmpfs (/dev/shm: no device, the back-end's own cost dominates) and one on a
real disk (/var/tmp).  Before every run on the disk image its dirty pages are written back and
its page cache is dropped (fsync + POSIX_FADV_DONTNEED), so each run starts cold and no run
inherits the previous one's cache; the back-ends read through the page cache (their defaults),
so the cache warms up during a run exactly as it would for a guest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from bench import PACKAGE_DIR, REPO, Benchmark, BenchError, Process, Row, cpu_seconds, progress

ANCHOR = "qsd"
BLKFE_SOURCE = PACKAGE_DIR / "blkfe.c"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", "-D_GNU_SOURCE", "-pthread")
DEFAULT_CACHE = REPO / ".cache" / "bench"


# --- the front-end -----------------------------------------------------------------------------


def build_blkfe(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Compiles blkfe.c once per source and flags version; returns the executable.

    The name carries a hash of both, so an edited source is rebuilt and concurrent callers
    (parallel tests) each rename a complete file into place.
    """
    cc = os.environ.get("CC", "cc")
    digest = hashlib.sha256(BLKFE_SOURCE.read_bytes() + (PACKAGE_DIR / "vu_client.h").read_bytes()
                            + " ".join((cc, *CFLAGS)).encode())
    exe = cache_dir / f"blkfe-{digest.hexdigest()[:16]}"
    if exe.exists():
        return exe
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{exe.name}.{os.getpid()}.tmp"
    r = subprocess.run([cc, *CFLAGS, str(BLKFE_SOURCE), "-o", str(tmp)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BenchError(f"compiling {BLKFE_SOURCE.name} failed:\n{r.stderr}")
    os.replace(tmp, exe)
    for old in cache_dir.glob("blkfe-*"):   # builds of earlier sources
        if old != exe:
            old.unlink(missing_ok=True)
    return exe


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str          # blkfe --rw
    bs: int
    qd: int
    queues: int = 1

    def blkfe_args(self) -> list[str]:
        return ["--rw", self.rw, "--bs", str(self.bs), "--qd", str(self.qd),
                "--queues", str(self.queues)]


WORKLOADS = {w.name: w for w in (
    Workload("randread-4k-qd1", "randread", 4096, 1),
    Workload("randread-4k-qd32", "randread", 4096, 32),
    Workload("randread-4k-qd128", "randread", 4096, 128),
    Workload("randwrite-4k-qd32", "randwrite", 4096, 32),
    Workload("seqread-128k-qd8", "seqread", 128 * 1024, 8),
    Workload("randread-4k-qd32-2q", "randread", 4096, 32, queues=2),
    # One 4 KiB segment per DISCARD / WRITE_ZEROES request (blkfe --rw randdiscard ...).
    Workload("discard-4k-qd32", "randdiscard", 4096, 32),
    Workload("write-zeroes-4k-qd32", "randwrite-zeroes", 4096, 32),
)}


class Frontend:
    """One blkfe --sync run: READY, go, JSON line, then stdin closed."""

    def __init__(self, exe: Path, sock: Path, workload: Workload, seconds: float, cpus: str,
                 seed: int, log_path: Path, extra: Sequence[str] = ()) -> None:
        argv = [str(exe), "--socket", str(sock), *workload.blkfe_args(), "--seconds", str(seconds),
                "--seed", str(seed), "--sync", *extra]
        if cpus:
            argv += ["--cpus", cpus]
        self.argv = argv
        self.log_path = log_path
        self._stderr: IO[bytes] = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True)
        # blkfe has its own stall watchdog; this one covers a back-end that never answers
        # during setup and anything else that would hang the whole benchmark.
        self._timer = threading.Timer(seconds + 60, self.proc.kill)
        self._timer.start()

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def _fail(self, what: str) -> BenchError:
        self.close()
        self._stderr.close()
        return BenchError(f"blkfe {what} (exit {self.proc.returncode}):\n"
                          f"{self.log_path.read_text(errors='replace')[-3000:]}")

    def wait_ready(self) -> None:
        if self._line() != "READY":
            raise self._fail("did not get ready")

    def go(self) -> None:
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
        """Lets blkfe disconnect and exit (it waits for stdin to close)."""
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
        return self.proc.returncode


# --- back-ends ---------------------------------------------------------------------------------


def _vhostd(*extra: str) -> Callable[[Path, Path, int], list[str]]:
    def argv(image: Path, sock: Path, queues: int) -> list[str]:
        # The default log level and I/O engine, as a user runs it.
        return [sys.executable, "-m", "vhostd", "blk", "--socket-path", str(sock),
                "--file", str(image), "--num-queues", str(queues), *extra]
    return argv


def _qsd(file_options: str) -> Callable[[Path, Path, int], list[str]]:
    def argv(image: Path, sock: Path, queues: int) -> list[str]:
        return [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=f,filename={image}{file_options}",
            "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
                        f"writable=on,num-queues={queues}",
        ]
    return argv


# name -> argv(image, socket, queues)
BACKENDS: dict[str, Callable[[Path, Path, int], list[str]]] = {
    "vhostd": _vhostd(),
    "qsd": _qsd(""),
    "qsd-io_uring": _qsd(",aio=io_uring"),
    # The anchors for discard-4k-qd32 / write-zeroes-4k-qd32: qsd's file node ignores a
    # guest's DISCARD unless discard=unmap (vhostd's default), so compare with these.
    "qsd-unmap": _qsd(",discard=unmap"),
    "qsd-unmap-io_uring": _qsd(",discard=unmap,aio=io_uring"),
    # Not run by default.  vhostd's one-request-at-a-time engine, for comparison:
    "vhostd-sync": _vhostd("--aio", "sync"),
    # QoS limits far above what the machine does: the cost of a gate on every
    # request (one clock read and two bucket updates), against "vhostd".
    "vhostd-limited": _vhostd("--limit", "total_iops_sec=1000000000", "--limit", "total_bytes_sec=1000000000000"),
    # Bounded busy-poll after each burst (lower latency at low queue depth).
    "vhostd-poll50": _vhostd("--poll-us", "50"),
    # O_DIRECT (QEMU's cache=none): the disk itself, no page cache; compare these among
    # themselves (--backends vhostd-direct,qsd-direct,... --images disk).
    "vhostd-direct": _vhostd("--direct"),
    "qsd-direct": _qsd(",cache.direct=on,aio=native"),
    "qsd-direct-io_uring": _qsd(",cache.direct=on,aio=io_uring"),
    # Dirty-page logging on, as while QEMU migrates the guest: the same back-end processes,
    # driven by blkfe --log (FRONTEND_OPTIONS); compared with their base names (log_vs_nolog).
    "vhostd-log": _vhostd(),
    "qsd-log": _qsd(""),
    # Guest RAM in many regions (blkfe --regions): the same back-end processes, their memory
    # table sent as one ADD_MEM_REG per region (CONFIGURE_MEM_SLOTS), every request's buffers
    # round-robin over them.  X-regions (--regions N, default 64) against X-regions1 (the same
    # layout in one region): regionsN_vs_1.  qsd (libvhost-user 7.2) has 32 slots only.
    "vhostd-regions1": _vhostd(),
    "vhostd-regions": _vhostd(),
    "qsd-regions1": _qsd(""),
    "qsd-regions": _qsd(""),
    # Regions hot-added and removed while the I/O runs (blkfe --add-regions-every): latency
    # of the requests in flight during an ADD_MEM_REG (add_p99_us ...), vhostd against qsd.
    "vhostd-hotadd": _vhostd(),
    "qsd-hotadd": _qsd(""),
}
DEFAULT_BACKENDS = ("vhostd", "qsd", "qsd-io_uring")
# vhostd-limited against vhostd, same round: limited_vs_unlimited (IOPS) and
# cpu_limited_vs_unlimited (back-end CPU per request); the goal: >= 0.97 IOPS.
LIMITED_PAIR = ("vhostd-limited", "vhostd")
# Back-end name -> extra blkfe options (regions and hot-add ones: frontend_options()).
FRONTEND_OPTIONS: dict[str, list[str]] = {"vhostd-log": ["--log"], "qsd-log": ["--log"]}
LOG_SUFFIX = "-log"
REGIONS1_SUFFIX = "-regions1"
REGIONS_SUFFIX = "-regions"
HOTADD_SUFFIX = "-hotadd"


def frontend_options(backend: str, args: argparse.Namespace) -> list[str]:
    if backend.endswith(REGIONS1_SUFFIX):
        return ["--regions", "1"]
    if backend.endswith(REGIONS_SUFFIX):
        return ["--regions", str(args.regions)]
    if backend.endswith(HOTADD_SUFFIX):
        return ["--regions", "1", "--add-regions-every", str(args.add_regions_every),
                "--add-regions-max", str(args.add_regions_max),
                "--add-region-mib", str(args.add_region_mib),
                "--change-window-ms", str(args.change_window_ms)]
    return FRONTEND_OPTIONS.get(backend, [])
# `vhostd` run from another checkout (--baseline-tree, its native module built in place), e.g.
# the commit before a change, to see that the change left the default path as fast as it was.
BASELINE = "vhostd-baseline"


def backend_argv(backend: str, image: Path, sock: Path, queues: int,
                 baseline_tree: Path | None) -> list[str]:
    if backend != BASELINE:
        return BACKENDS[backend](image, sock, queues)
    if baseline_tree is None:
        raise BenchError(f"{BASELINE} needs --baseline-tree DIR")
    # -P: the current directory (this checkout) must not come before the baseline's tree.
    return ["env", f"PYTHONPATH={baseline_tree}", sys.executable, "-P", "-m", "vhostd", "blk",
            "--socket-path", str(sock), "--file", str(image), "--num-queues", str(queues)]


@dataclass(frozen=True)
class Placement:
    backend_cpus: str   # taskset -c list, "" for none
    frontend_cpus: str  # blkfe --cpus list


def placement(queues: int) -> Placement:
    ncpu = os.cpu_count() or 1
    if ncpu < 2:
        return Placement("", "")
    if queues == 1:
        return Placement("0", "1")
    every = ",".join(str(c) for c in range(min(ncpu, queues)))
    return Placement(every, every)


# --- images ----------------------------------------------------------------------------------


def make_image(path: Path, mib: int) -> None:
    """Random data in every block: reads hit allocated extents, never holes."""
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())


def drop_page_cache(path: Path) -> None:
    """Writes back and evicts the file's cached pages, so a run starts cold.

    POSIX_FADV_DONTNEED drops clean pages only: the fsync first makes the dirty ones clean.
    It needs no privileges and touches no other file (unlike /proc/sys/vm/drop_caches).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_fraction(path: Path) -> float | None:
    """Share of the file's bytes in the page cache (util-linux fincore), or None."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE",
                              str(path)], capture_output=True, text=True, check=True).stdout
        res, size = (int(x) for x in out.split())
        return res / size if size else None
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None


# --- runs ------------------------------------------------------------------------------------


def _taskset(cpus: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def run_once(exe: Path, backend: str, workload: Workload, image_kind: str, image: Path,
             workdir: Path, args: argparse.Namespace, rnd: int) -> Row:
    tag = f"{image_kind}-{workload.name}-{backend}-r{rnd}"
    sock = workdir / f"{backend}.sock"
    sock.unlink(missing_ok=True)   # qsd replaces a stale socket, vhostd may not
    where = placement(workload.queues)
    argv = _taskset(where.backend_cpus, backend_argv(backend, image, sock, workload.queues,
                                                     args.baseline_tree))
    fe_options = frontend_options(backend, args)
    with Process(argv, workdir / f"{tag}.log", socket=sock) as proc:
        if image_kind == "disk" and not args.warm_cache:
            drop_page_cache(image)
        fe = Frontend(exe, sock, workload, args.seconds, where.frontend_cpus, args.seed + rnd,
                      workdir / f"{tag}.blkfe.log", fe_options)
        try:
            fe.wait_ready()
            cpu0, fe0 = proc.cpu_seconds(), cpu_seconds(fe.proc.pid)
            fe.go()
            res = fe.result()
            cpu1, fe1 = proc.cpu_seconds(), cpu_seconds(fe.proc.pid)
            cached = cached_fraction(image) if image_kind == "disk" else None
        except BenchError as e:
            raise BenchError(f"{tag}: {e}\n--- {backend} log ---\n{proc.log()}") from None
        finally:
            rc = fe.close()
        if rc != 0 or proc.proc.poll() is not None:
            raise BenchError(f"{tag}: blkfe exited {rc}, back-end "
                             f"{'exited ' + str(proc.proc.returncode) if proc.proc.poll() is not None else 'alive'}"
                             f"\n--- {backend} log ---\n{proc.log()}")
    if res.get("log") and (not res.get("logged_pages") or res.get("logged_pages_outside_ram")):
        # Logging "on" that logged nothing (or outside guest RAM) measures nothing valid.
        raise BenchError(f"{tag}: blkfe --log saw {res.get('logged_pages')} pages logged, "
                         f"{res.get('logged_pages_outside_ram')} outside guest RAM")
    cpu, secs, reqs = cpu1 - cpu0, res["seconds"], res["requests"]
    return {
        "image": image_kind, "workload": workload.name, "backend": backend, "round": rnd,
        "iops": res["iops"], "mib_s": res["mib_s"], "p50_us": res["p50_us"],
        "p99_us": res["p99_us"], "p999_us": res["p999_us"], "mean_us": res["mean_us"],
        "requests": reqs, "seconds": secs,
        "cpu_s": cpu, "cpu_pct": 100 * cpu / secs,
        "cpu_s_per_mreq": cpu / (reqs / 1e6) if reqs else None,
        "fe_cpu_pct": 100 * (fe1 - fe0) / secs,
        "kicks_per_req": res["kicks_per_req"], "wakeups_per_req": res["wakeups_per_req"],
        # How much of the disk image the run pulled into the page cache (cold at the start).
        "cached_pct_end": None if cached is None else 100 * cached,
        # blkfe --log: pages the back-end logged, summed over its 100 ms syncs.
        "logged_pages": res.get("logged_pages"),
        "logged_pages_outside_ram": res.get("logged_pages_outside_ram"),
        "max_us": res["max_us"],
        # blkfe --regions / --add-regions-every.
        "regions": res.get("regions"), "mem_setup": res.get("mem_setup"),
        **{k: res.get(k) for k in HOTADD_KEYS},
        # The stall an ADD_MEM_REG adds, against requests of the same run that overlapped no
        # change: the back-ends' own latency (qsd's p99 is already ms at QD32) cancels out.
        "add_p99_vs_quiet": (res["add_p99_us"] / res["quiet_p99_us"]
                             if res.get("add_p99_us") and res.get("quiet_p99_us") else None),
        "backend_argv": argv,
        "frontend_options": fe_options,
    }


# blkfe --add-regions-every: changes done, latency of the requests in flight during an
# ADD_MEM_REG window (add_*), a REM_MEM_REG window (rem_*) or neither (quiet_*), and the
# changes' own round trips (request sent to ack).
HOTADD_KEYS = ("region_changes", "regions_added", "regions_removed",
               "add_requests", "add_p50_us", "add_p99_us", "add_p999_us", "add_max_us",
               "rem_requests", "rem_p50_us", "rem_p99_us", "rem_p999_us", "rem_max_us",
               "quiet_requests", "quiet_p50_us", "quiet_p99_us", "quiet_p999_us", "quiet_max_us",
               "add_ack_p50_us", "add_ack_max_us", "rem_ack_p50_us", "rem_ack_max_us")


def _same_round_ratios(runs: list[Row], backend: str, key: str, anchor_name: str = ANCHOR) -> list[float]:
    anchor = {r["round"]: r[key] for r in runs if r["backend"] == anchor_name and r.get(key)}
    return [r[key] / anchor[r["round"]] for r in runs
            if r["backend"] == backend and r.get(key) is not None and r["round"] in anchor]


def _median(runs: list[Row], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _ratio(runs: list[Row], backend: str, key: str, anchor: str) -> float | None:
    values = _same_round_ratios(runs, backend, key, anchor)
    return statistics.median(values) if values else None


def _regions_columns(group: list[Row], b: str, backends: list[str], regions: int) -> Row:
    """X-regions against X-regions1 (IOPS and back-end CPU per request), same round."""
    if not b.endswith(REGIONS_SUFFIX) or (one := b + "1") not in backends:
        return {}
    return {f"regions{regions}_vs_1": _ratio(group, b, "iops", one),
            f"cpu_regions{regions}_vs_1": _ratio(group, b, "cpu_s_per_mreq", one)}


def _hotadd_columns(group: list[Row], mine: list[Row], b: str, backends: list[str]) -> Row:
    """Latency while regions are added: medians over rounds, and vhostd against qsd."""
    if not b.endswith(HOTADD_SUFFIX):
        return {}
    cols: Row = {k: _median(mine, k) for k in (
        "region_changes", "add_p50_us", "add_p99_us", "add_max_us", "rem_p99_us", "rem_max_us",
        "quiet_p99_us", "add_p99_vs_quiet", "add_ack_p50_us", "add_ack_max_us")}
    anchor = ANCHOR + HOTADD_SUFFIX
    if b != anchor and anchor in backends:
        cols |= {f"add_p99_vs_{ANCHOR}": _ratio(group, b, "add_p99_us", anchor),
                 f"add_max_vs_{ANCHOR}": _ratio(group, b, "add_max_us", anchor)}
    return cols


def summarize(runs: list[Row], failures: list[Row], images: list[str], workloads: list[Workload],
              backends: list[str], regions: int = 64) -> list[Row]:
    """One row per image, workload and back-end: medians over rounds, same-round ratios."""
    rows: list[Row] = []
    for image in images:
        for w in workloads:
            group = [r for r in runs if r["image"] == image and r["workload"] == w.name]
            for b in backends:
                mine = [r for r in group if r["backend"] == b]
                failed = [f for f in failures
                          if (f["image"], f["workload"], f["backend"]) == (image, w.name, b)]
                iops_ratio = _same_round_ratios(group, b, "iops")
                cpu_ratio = _same_round_ratios(group, b, "cpu_s_per_mreq")
                # X-log against X (logging off), when both ran.
                base = b[:-len(LOG_SUFFIX)] if b.endswith(LOG_SUFFIX) else None
                log_cols: Row = {}
                if b == "vhostd" and BASELINE in backends:
                    base_iops = _same_round_ratios(group, b, "iops", BASELINE)
                    base_cpu = _same_round_ratios(group, b, "cpu_s_per_mreq", BASELINE)
                    log_cols = {
                        "iops_vs_baseline": statistics.median(base_iops) if base_iops else None,
                        "cpu_vs_baseline": statistics.median(base_cpu) if base_cpu else None,
                    }
                if any(n.endswith(LOG_SUFFIX) and n[:-len(LOG_SUFFIX)] in backends for n in backends):
                    log_iops = _same_round_ratios(group, b, "iops", base) if base in backends else []
                    log_cpu = (_same_round_ratios(group, b, "cpu_s_per_mreq", base)
                               if base in backends else [])
                    log_cols |= {
                        "log_vs_nolog": statistics.median(log_iops) if log_iops else None,
                        "cpu_log_vs_nolog": statistics.median(log_cpu) if log_cpu else None,
                        "logged_pages_per_s": statistics.median(rates) if (rates := [
                            r["logged_pages"] / r["seconds"] for r in mine
                            if r.get("logged_pages") is not None]) else None,
                    }
                if b == LIMITED_PAIR[0] and LIMITED_PAIR[1] in backends:
                    log_cols |= {
                        "limited_vs_unlimited": _ratio(group, b, "iops", LIMITED_PAIR[1]),
                        "cpu_limited_vs_unlimited": _ratio(group, b, "cpu_s_per_mreq", LIMITED_PAIR[1]),
                    }
                rows.append({
                    "image": image, "workload": w.name, "backend": b,
                    "runs": len(mine), **({"failed": len(failed)} if failures else {}),
                    "iops": _median(mine, "iops"),
                    "mib_s": _median(mine, "mib_s"),
                    "p50_us": _median(mine, "p50_us"),
                    "p99_us": _median(mine, "p99_us"),
                    "be_cpu_pct": _median(mine, "cpu_pct"),
                    "cpu_s_per_mreq": _median(mine, "cpu_s_per_mreq"),
                    f"iops_vs_{ANCHOR}": statistics.median(iops_ratio) if iops_ratio else None,
                    f"cpu_vs_{ANCHOR}": statistics.median(cpu_ratio) if cpu_ratio else None,
                    "fe_cpu_pct": _median(mine, "fe_cpu_pct"),
                    **log_cols,
                    **_regions_columns(group, b, backends, regions),
                    **_hotadd_columns(group, mine, b, backends),
                    **({"cached_pct_end": _median(mine, "cached_pct_end")} if image == "disk" else {}),
                    "per_run": mine,
                    **({"failures": failed} if failed else {}),
                })
    return rows


# --- the benchmark ---------------------------------------------------------------------------


def _names(spec: str, known: dict[str, Any], what: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise BenchError(f"unknown {what} {unknown}; choose from {', '.join(known)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=5, help="measured time per run (default 5)")
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved rounds: each workload runs A,B,C once per round (default 2)")
    p.add_argument("--image-mib", type=int, default=1024, help="image size (default 1024)")
    p.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                   help=f"comma-separated, from {', '.join(BACKENDS)} "
                        f"(default {','.join(DEFAULT_BACKENDS)}); ratios are against {ANCHOR}, "
                        f"and X{LOG_SUFFIX} (blkfe --log: dirty logging on) against X")
    p.add_argument("--baseline-tree", type=Path, default=None,
                   help=f"a vhostd checkout with its native module built in place (git worktree "
                        f"add DIR REV; setup.py build_ext --inplace): back-end {BASELINE} runs "
                        f"it, and vhostd gets iops_vs_baseline / cpu_vs_baseline")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, from {', '.join(WORKLOADS)} (default: all)")
    p.add_argument("--images", default="tmpfs,disk",
                   help="tmpfs (image in --tmpfs-dir), disk (image in --disk-dir); default both")
    p.add_argument("--tmpfs-dir", type=Path, default=Path("/dev/shm"))
    p.add_argument("--disk-dir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--warm-cache", action="store_true",
                   help="do not drop the disk image's page cache before each run")
    p.add_argument("--seed", type=int, default=1, help="blkfe offsets (plus the round number)")
    p.add_argument("--regions", type=int, default=64,
                   help="guest RAM regions of the X-regions back-ends (blkfe --regions, "
                        "default 64; qsd 7.2 has 32 slots)")
    p.add_argument("--add-regions-every", type=int, default=100, metavar="MS",
                   help="X-hotadd: a region added or removed every MS ms (default 100)")
    p.add_argument("--add-regions-max", type=int, default=8,
                   help="X-hotadd: regions added before they are removed again (default 8)")
    p.add_argument("--add-region-mib", type=int, default=64,
                   help="X-hotadd: size of an added region (default 64)")
    p.add_argument("--change-window-ms", type=int, default=25,
                   help="X-hotadd: a request counts as in flight during a change from the "
                        "request to MS after its ack (default 25: vhostd defers a removal by "
                        "20 ms)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="sockets and logs (default: a temporary directory, removed)")


def unavailable() -> str | None:
    if shutil.which(os.environ.get("CC", "cc")) is None:
        return "no C compiler (cc) to build bench/blkfe.c"
    if shutil.which("qemu-storage-daemon") is None:
        return "qemu-storage-daemon not found (install qemu-system-common)"
    if shutil.which("taskset") is None:
        return "taskset not found (util-linux)"
    return None


def run(args: argparse.Namespace) -> list[Row]:
    backends = _names(args.backends, {**BACKENDS, BASELINE: 0}, "back-ends")
    if BASELINE in backends and (args.baseline_tree is None
                                 or not (args.baseline_tree / "vhostd").is_dir()):
        raise BenchError(f"{BASELINE} needs --baseline-tree DIR, a vhostd checkout "
                         f"(got {args.baseline_tree})")
    workloads = [WORKLOADS[n] for n in _names(args.workloads, WORKLOADS, "workloads")]
    images = _names(args.images, {"tmpfs": 0, "disk": 0}, "images")
    exe = build_blkfe()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vhostd-blk-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    image_dirs: list[Path] = []
    runs: list[Row] = []
    failures: list[Row] = []
    try:
        for kind in images:
            parent = args.tmpfs_dir if kind == "tmpfs" else args.disk_dir
            d = Path(tempfile.mkdtemp(prefix="vhostd-blk-bench-", dir=parent))
            image_dirs.append(d)
            image = d / "disk.img"
            progress(f"blk-backend: writing a {args.image_mib} MiB image in {parent}")
            make_image(image, args.image_mib)
            for rnd in range(1, args.rounds + 1):
                for w in workloads:
                    for b in backends:
                        progress(f"blk-backend {kind} round {rnd}/{args.rounds} {w.name}: {b}")
                        try:
                            r = run_once(exe, b, w, kind, image, workdir, args, rnd)
                        except BenchError as e:
                            # One broken run must not throw away the others: it is reported.
                            progress(f"  FAILED: {e}")
                            failures.append({"image": kind, "workload": w.name, "backend": b,
                                             "round": rnd, "error": str(e)[-3000:]})
                            continue
                        runs.append(r)
                        progress(f"  {r['iops']:.0f} IOPS, p99 {r['p99_us']:.0f} us, "
                                 f"back-end {r['cpu_pct']:.0f}% CPU, "
                                 f"{r['cpu_s_per_mreq']:.2f} CPU s/Mreq"
                                 + (f"; {r['region_changes']} region changes, p99 during adds "
                                    f"{r['add_p99_us']:.0f} us, max {r['add_max_us']:.0f} us"
                                    if r.get("region_changes") is not None else ""))
            if kind == "disk":
                frac = cached_fraction(image)
                if frac is not None:
                    progress(f"blk-backend: disk image {100 * frac:.0f}% in page cache at the end")
            shutil.rmtree(d, ignore_errors=True)
        if not runs:
            raise BenchError("every run failed:\n" + "\n".join(f["error"] for f in failures))
        return summarize(runs, failures, images, workloads, backends, args.regions)
    finally:
        for d in image_dirs:
            shutil.rmtree(d, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark(
    name="blk-backend",
    help="C vhost-user-blk front-end vs vhostd / qemu-storage-daemon on tmpfs and disk "
         "(IOPS, p50/p99, back-end CPU per request)",
    run=run,
    add_arguments=add_arguments,
    unavailable=unavailable,
)
