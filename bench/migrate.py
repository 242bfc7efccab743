"""migrate: live migration of a TCG guest whose disk is a vhost-user-blk device, served by
vhostd and by qemu-storage-daemon (the anchor), runs interleaved per round.

For each back-end: two back-end processes on the same image (source and destination), the
source QEMU (tests/guestvm.py, 512 MiB memfd RAM, QMP) runs a write/verify loop in the guest
(64 KiB O_DIRECT writes of random data to random blocks, each read back with O_DIRECT and
compared), the destination QEMU gets the same command line with its own chardev, QMP socket
and `-incoming unix:PATH`.  The source gets fixed `max-bandwidth` and `downtime-limit` (the
same for both back-ends), then `migrate`; `query-migrate` is polled until it completes.  The
host then writes a flag into the image, quits the source, and the guest, now on the
destination, sees the flag, stops its loop and exits; its console must show no error.

Reported: `total-time` and `downtime` (ms) from query-migrate, medians over rounds, and the
ratios vhostd/qsd (medians of same-round ratios).  Every QEMU and back-end process is one we
started, stopped by its own PID; each step has a timeout.
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
from pathlib import Path
from typing import Any, Callable

from bench import REPO, Benchmark, BenchError, Process, Row, progress

# The guest harness and the QMP client live with the tests (tests/ on sys.path, as guest_fio).
sys.path.insert(0, str(REPO / "tests"))
import guestvm  # noqa: E402
from migration import MigrationTimeout, console_rc, destination, qmp_args, wait_migration  # noqa: E402
from qmp import Qmp, QmpError  # noqa: E402

ANCHOR = "qsd"
MIB = 1 << 20
DISK_MIB = 256
GUEST_MB = 512
WRITE_AREA = 64 * MIB          # the loop writes 64 KiB blocks in [64 MiB, 64 MiB + 128 MiB)
WRITE_BLOCKS = 2048
FLAG_OFFSET = 250 * MIB
FLAG = b"MIGRATED"
LOAD, DONE = "BENCH-MIGRATE-LOAD", "BENCH-MIGRATE-DONE"


def _vhostd(image: Path, sock: Path) -> list[str]:
    # The default engine and log level, as a user runs it.
    return [sys.executable, "-m", "vhostd", "blk", "--socket-path", str(sock), "--file", str(image)]


def _qsd(image: Path, sock: Path) -> list[str]:
    # locking=off: the source's and the destination's daemon both open the image for writing
    # (QEMU's own block layer hands the image over at switch-over; two daemons cannot).
    return [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=f,filename={image},locking=off",
        "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
                    "writable=on,num-queues=1",
    ]


BACKENDS: dict[str, Callable[[Path, Path], list[str]]] = {"vhostd": _vhostd, ANCHOR: _qsd}


def guest_script() -> str:
    """Until the host's flag appears on the disk: one 64 KiB block of random data written with
    O_DIRECT to a random block of the write area, read back with O_DIRECT and compared."""
    first = WRITE_AREA // (64 * 1024)
    return f"""
D=/dev/vda
md5() {{ md5sum | cut -c1-32; }}
flag() {{ [ "$(dd if=$D bs=512 skip={FLAG_OFFSET // 512} count=1 iflag=direct 2>/dev/null \\
          | head -c {len(FLAG)})" = "{FLAG.decode()}" ]; }}
echo {LOAD}
i=0
until flag; do
  w=$(( $(od -An -N2 -tu2 /dev/urandom) % {WRITE_BLOCKS} ))
  dd if=/dev/urandom of=/tmp/w bs=64k count=1 2>/dev/null
  dd if=/tmp/w of=$D bs=64k seek=$(({first} + w)) count=1 oflag=direct conv=notrunc 2>/dev/null
  back=$(dd if=$D bs=64k skip=$(({first} + w)) count=1 iflag=direct 2>/dev/null | md5)
  [ "$back" = "$(md5 < /tmp/w)" ] || {{ echo "BAD WRITE block $w round $i"; exit 1; }}
  i=$((i + 1))
  [ $i -lt 100000 ] || {{ echo "NO FLAG after $i rounds"; exit 1; }}
done
echo "ROUNDS $i"
echo {DONE}
"""


def make_image(path: Path) -> None:
    with open(path, "wb") as f:
        for _ in range(DISK_MIB):
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())


def set_flag(image: Path, flag: bytes) -> None:
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, flag.ljust(512, b"\0"), FLAG_OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)


def _wait(q: Qmp, timeout: float) -> dict[str, Any]:
    """The migration's end; one that does not end is cancelled and reported."""
    try:
        return wait_migration(q, timeout, poll=0.05)
    except MigrationTimeout as e:
        try:
            q.command("migrate_cancel")
        except QmpError:
            pass
        raise BenchError(str(e)) from None


def run_once(backend: str, image: Path, workdir: Path, args: argparse.Namespace, rnd: int) -> Row:
    tag = f"{backend}-r{rnd}"
    tmp = workdir / tag
    tmp.mkdir()
    src_sock, dst_sock = tmp / "src.sock", tmp / "dst.sock"
    mig, qmp_src, qmp_dst = tmp / "mig.sock", tmp / "qmp-src.sock", tmp / "qmp-dst.sock"
    set_flag(image, b"")   # the last run's flag must not end this one's loop
    src_be = Process(BACKENDS[backend](image, src_sock), tmp / "src-backend.log", socket=src_sock)
    try:
        dst_be = Process(BACKENDS[backend](image, dst_sock), tmp / "dst-backend.log",
                         socket=dst_sock)
    except BaseException:
        src_be.stop()
        raise

    def logs() -> str:
        return (f"--- source {backend} ---\n{src_be.log(2000)}\n"
                f"--- destination {backend} ---\n{dst_be.log(2000)}")

    try:
        src = guestvm.start_guest(guest_script(),
                                  [*guestvm.vhost_user_blk_args(src_sock), *qmp_args(qmp_src)],
                                  mem_mb=GUEST_MB, timeout=args.timeout)
        with src:
            if not src.wait_for(LOAD, 120):
                raise BenchError(f"{tag}: the guest never started its loop\n"
                                 f"{src.result(5).describe()}\n{logs()}")
            time.sleep(args.seconds)   # the loop runs before the migration starts
            dst = destination(src, guestvm.vhost_user_blk_args(dst_sock), qmp_dst, mig,
                              tmp / "dst-qemu", args.timeout)
            with dst:
                try:
                    Qmp(qmp_dst).close()   # the destination is up and listening for the stream
                except QmpError:
                    raise BenchError(f"{tag}: destination QEMU did not start\n"
                                     f"{dst.result(5).describe()}") from None
                with Qmp(qmp_src) as q:
                    q.command("migrate-set-parameters", **{
                        "max-bandwidth": args.bandwidth_mib * MIB,
                        "downtime-limit": args.downtime_limit_ms})
                    src_cpu0 = src_be.cpu_seconds()
                    q.command("migrate", uri=f"unix:{mig}")
                    status = _wait(q, args.migration_timeout)
                    src_cpu1 = src_be.cpu_seconds()
                    if status.get("status") != "completed":
                        raise BenchError(f"{tag}: migration {status.get('status')}: {status}\n"
                                         f"{dst.result(5).describe()}\n{logs()}")
                    set_flag(image, FLAG)
                    q.command("quit")
                src.result(timeout=30)
                result = dst.result(timeout=120)
        console = result.console
        rounds = re.search(r"ROUNDS (\d+)", console)
        if (DONE not in console or console_rc(console) != 0 or "BAD" in console
                or rounds is None):
            raise BenchError(f"{tag}: the guest failed on the destination\n"
                             f"{result.describe()[-4000:]}\n{logs()}")
    finally:
        src_be.stop()
        dst_be.stop()
    ram = status.get("ram", {})
    return {
        "backend": backend, "round": rnd,
        "total_ms": float(status["total-time"]),
        "downtime_ms": float(status["downtime"]),
        "setup_ms": status.get("setup-time"),
        "ram_transferred_mib": ram.get("transferred", 0) / MIB,
        "dirty_sync_count": ram.get("dirty-sync-count"),
        "src_be_cpu_s": src_cpu1 - src_cpu0,
        "guest_rounds": int(rounds.group(1)),
        "status": status,
    }


def _same_round_ratios(runs: list[Row], backend: str, key: str) -> list[float]:
    anchor = {r["round"]: r[key] for r in runs if r["backend"] == ANCHOR and r[key]}
    return [r[key] / anchor[r["round"]] for r in runs
            if r["backend"] == backend and r["round"] in anchor]


def summarize(runs: list[Row], failures: list[Row], backends: list[str]) -> list[Row]:
    rows: list[Row] = []
    for b in backends:
        mine = [r for r in runs if r["backend"] == b]
        if not mine:
            rows.append({"backend": b, "runs": 0,
                         "failed": sum(f["backend"] == b for f in failures)})
            continue

        def med(key: str) -> float:
            return float(statistics.median(r[key] for r in mine))

        down = _same_round_ratios(runs, b, "downtime_ms") if b != ANCHOR else []
        total = _same_round_ratios(runs, b, "total_ms") if b != ANCHOR else []
        rows.append({
            "backend": b, "runs": len(mine),
            **({"failed": sum(f["backend"] == b for f in failures)} if failures else {}),
            "downtime_ms": med("downtime_ms"),
            "total_ms": med("total_ms"),
            f"downtime_vs_{ANCHOR}": statistics.median(down) if down else None,
            f"total_vs_{ANCHOR}": statistics.median(total) if total else None,
            "downtime_min_ms": min(r["downtime_ms"] for r in mine),
            "downtime_max_ms": max(r["downtime_ms"] for r in mine),
            "ram_mib": med("ram_transferred_mib"),
            "src_be_cpu_s": med("src_be_cpu_s"),
            "guest_rounds": med("guest_rounds"),
            "per_run": mine,
            **({"failures": [f for f in failures if f["backend"] == b]} if failures else {}),
        })
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds: vhostd, qsd, vhostd, qsd... (default 3)")
    p.add_argument("--seconds", type=float, default=3.0,
                   help="the guest's write/verify loop runs this long before `migrate` (default 3)")
    p.add_argument("--bandwidth-mib", type=int, default=256,
                   help="migrate-set-parameters max-bandwidth in MiB/s (default 256)")
    p.add_argument("--downtime-limit-ms", type=int, default=100,
                   help="migrate-set-parameters downtime-limit in ms (default 100)")
    p.add_argument("--backends", default=f"vhostd,{ANCHOR}",
                   help=f"comma-separated, in the order run each round (default vhostd,{ANCHOR})")
    p.add_argument("--migration-timeout", type=float, default=120,
                   help="seconds for one migration before it is cancelled (default 120)")
    p.add_argument("--timeout", type=float, default=300,
                   help="bound on each QEMU's life in seconds (default 300)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="image, sockets and logs (default: a temporary directory, removed)")


def unavailable() -> str | None:
    why = guestvm.unavailable_reason()
    if why is None and shutil.which("qemu-storage-daemon") is None:
        why = "qemu-storage-daemon not found (install qemu-system-common)"
    return why


def run(args: argparse.Namespace) -> list[Row]:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise BenchError(f"unknown back-ends {unknown}; choose from {', '.join(BACKENDS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vhostd-bench-migrate-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs: list[Row] = []
    failures: list[Row] = []
    try:
        image = workdir / "disk.img"
        make_image(image)
        guestvm.build_initramfs()   # once, before any timing
        for rnd in range(1, args.rounds + 1):
            for b in backends:
                progress(f"migrate round {rnd}/{args.rounds}: {b}")
                try:
                    r = run_once(b, image, workdir, args, rnd)
                except BenchError as e:
                    # One broken run must not throw away the others: it is reported.
                    progress(f"  FAILED: {e}")
                    failures.append({"backend": b, "round": rnd, "error": str(e)[-4000:]})
                    continue
                runs.append(r)
                progress(f"  total {r['total_ms']:.0f} ms, downtime {r['downtime_ms']:.0f} ms, "
                         f"{r['ram_transferred_mib']:.0f} MiB sent, "
                         f"{r['guest_rounds']} guest write/verify rounds")
        if not runs:
            raise BenchError("every run failed:\n" + "\n".join(f["error"] for f in failures))
        return summarize(runs, failures, backends)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


BENCHMARK = Benchmark(
    name="migrate",
    help="live migration of a TCG guest under O_DIRECT write/verify load, disk on vhostd vs "
         "qemu-storage-daemon (total time, downtime)",
    run=run,
    add_arguments=add_arguments,
    unavailable=unavailable,
)
