"""What the network benchmarks (net-tx, net-rx, guest-iperf, net-null, tso, scaling) share: the
namespace, the two back-ends (vhostd and the DPDK anchor), an interactive dpdk-testpmd, the
tapbound program, same-round ratios and re-runs of contended runs.

The module name starts with "_" so the registry does not look for a BENCHMARK in it.

CPU layout on the 2-core machines (see /work/shared/PEERS.md): the back-end under test runs
on CPU 0, the DPDK front-end (which busy-polls) on CPU 1.  On an otherwise idle machine each
back-end in turn has CPU 0 to itself, so a ratio compares what they do per frame; other load
on either CPU shows up in the *_wait_pct columns (run_delay).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable, Protocol, Sequence

from bench import PACKAGE_DIR, REPO, BenchError, Process, Row, cpu_seconds, progress

# The namespace helper lives with the tests (as guestvm does); both import it from tests/.
sys.path.insert(0, str(REPO / "tests"))
from netns import NetNs, netns, netns_available  # noqa: E402

__all__ = ["NetNs", "netns", "netns_available"]

VHOSTD, ANCHOR = "vhostd", "dpdk"
BACKENDS = (VHOSTD, ANCHOR)
BOUND = "tapbound"   # the one-frame-per-syscall tap bound (bench/tapbound.c) in net-tx and net-rx
BACKEND_CPU, FRONTEND_CPU = 0, 1
TAP = "nbtap0"
TESTPMD = "dpdk-testpmd"
# Enough mbufs to fill a 32768-entry ring (net-rx) plus in-flight bursts, within -m 512.
TESTPMD_MBUFS = 65536
# DPDK's net_tap asks for one real-time signal per received frame unless none is free;
# with 35..63 ignored it polls with readv() instead (~20x faster, PEERS.md).
IGNORE_RT_SIGNALS = "for s in $(seq 35 63); do trap '' $s; done; "
# Frame sizes are given as Ethernet sizes (RFC 2544: 64 ... 1518 B), which count the 4-byte
# FCS; taps and virtio rings carry frames without it.  1518 B is thus a 1514-byte frame, the
# largest a tap with the default 1500 MTU lets AF_PACKET send.
FCS = 4

_prefixes = itertools.count()


def unavailable() -> str | None:
    why = netns_available()
    if why:
        return why
    for tool in (TESTPMD, "cc", "stdbuf", "taskset"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install dpdk gcc coreutils util-linux)"
    if (os.cpu_count() or 1) < 2:
        return "needs 2 CPUs (back-end on CPU 0, front-end on CPU 1)"
    return None


def carried(size: int) -> int:
    """Bytes a tap or a virtio ring carries for an Ethernet frame of `size` bytes."""
    if size < 64:
        raise BenchError(f"frame size {size} is below Ethernet's 64 B minimum")
    return size - FCS


def pinned(cpu: int, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv]


def listening_in(pid: int, path: Path) -> bool:
    """Whether `path` listens, as seen from the network namespace of `pid`.

    /proc/net/unix lists only the reader's namespace; /proc/PID/net/unix lists PID's.
    """
    target = str(path)
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                # Num RefCount Protocol Flags Type St Inode Path; 0x10000 is __SO_ACCEPTCON.
                if len(parts) >= 8 and parts[7] == target and int(parts[3], 16) & 0x10000:
                    return True
    except FileNotFoundError:
        pass
    return False


def run_delay(pid: int) -> float:
    """Seconds the threads of `pid` spent runnable but waiting for a CPU (schedstat field 2).

    About 0 on an otherwise idle machine: it is how other load on a shared machine shows in
    the results, since a rate alone cannot tell a slower back-end from a preempted one.
    """
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass  # the thread exited meanwhile
    return total / 1e9


def tap_counters(ns: NetNs, tap: str) -> tuple[dict[str, int], float]:
    """The tap's counters and the time they were read (middle of the read)."""
    t0 = time.monotonic()
    stats = ns.read_stats(tap, "rx_packets", "rx_bytes", "rx_dropped",
                          "tx_packets", "tx_bytes", "tx_dropped")
    return stats, (t0 + time.monotonic()) / 2


# --- dpdk-testpmd, driven through its prompt ---------------------------------------------------


class TestPmd:
    """dpdk-testpmd in interactive mode, its commands written to stdin.

    The prompt lets us read port counters exactly at the window's edges; stdbuf makes its
    printf output line-buffered in a pipe, so a command's output is complete once the next
    prompt appears.  Both lcores (main and forwarding) go on one CPU: testpmd refuses to run
    without a forwarding lcore besides the main one, and the main one only sleeps in read().
    """

    PROMPT = b"testpmd> "

    def __init__(self, cpu: int, vdevs: Sequence[str], app_args: Sequence[str], log_path: Path,
                 ns: NetNs | None = None, ignore_rt_signals: bool = False, nice: int = 0,
                 timeout: float = 30.0) -> None:
        self.file_prefix = f"vhd-bench-{os.getpid()}-{next(_prefixes)}"
        testpmd = ["stdbuf", "-oL", TESTPMD, "--no-pci", f"--file-prefix={self.file_prefix}",
                   f"--lcores=(0,1)@{cpu}", "--no-huge", "-m", "512"]
        for v in vdevs:
            testpmd += ["--vdev", v]
        # --disable-link-check: a vhost port is down until its front-end comes; waiting for it
        # would cost 9 s per start.
        testpmd += ["--", "-i", "--disable-link-check", f"--total-num-mbufs={TESTPMD_MBUFS}",
                    *app_args]
        argv: list[str] = testpmd
        if nice:
            argv = ["nice", "-n", str(nice), *argv]
        if ignore_rt_signals:
            argv = ["sh", "-c", IGNORE_RT_SIGNALS + "exec " + shlex.join(testpmd)]
        argv = pinned(cpu, argv)  # the control threads too, not only the lcores
        if ns is not None:
            argv = ns.cmd(argv)
        self.argv = argv
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")
        self._out = bytearray()
        self._cond = threading.Condition()
        # `ip netns exec`, taskset, sh and stdbuf all exec: the PID is testpmd's own.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        try:
            self._wait_prompt(0, timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            self._log.write(chunk)
            with self._cond:
                self._out += chunk
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait_prompt(self, start: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.PROMPT not in self._out[start:]:
                left = deadline - time.monotonic()
                if not self._reader.is_alive() or self.proc.poll() is not None:
                    raise BenchError(f"{TESTPMD} exited ({self.proc.poll()}):\n{self.log()}")
                if left <= 0:
                    raise BenchError(f"{TESTPMD} gave no prompt in {timeout:.0f} s:\n{self.log()}")
                self._cond.wait(min(left, 0.2))
            end = self._out.index(self.PROMPT, start)
            return self._out[start:end].decode(errors="replace")

    def command(self, line: str, timeout: float = 15.0) -> str:
        """Runs one command; returns what it printed before the next prompt."""
        with self._cond:
            start = len(self._out)
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"{TESTPMD} exited ({self.proc.poll()}):\n{self.log()}") from None
        return self._wait_prompt(start, timeout)

    def port_stats(self, port: int) -> dict[str, int]:
        out = self.command(f"show port stats {port}")
        rx = re.search(r"RX-packets:\s+(\d+)\s+RX-missed:\s+(\d+)\s+RX-bytes:\s+(\d+)", out)
        tx = re.search(r"TX-packets:\s+(\d+)\s+TX-errors:\s+(\d+)\s+TX-bytes:\s+(\d+)", out)
        nombuf = re.search(r"RX-nombuf:\s+(\d+)", out)
        if not (rx and tx):
            raise BenchError(f"no port statistics in:\n{out}")
        return {"rx_packets": int(rx[1]), "rx_missed": int(rx[2]), "rx_bytes": int(rx[3]),
                "rx_nombuf": int(nombuf[1]) if nombuf else 0,
                "tx_packets": int(tx[1]), "tx_errors": int(tx[2]), "tx_bytes": int(tx[3])}

    def fwd_stats(self, port: int) -> dict[str, int]:
        """The forwarding engine's counters: unlike port stats, they count the frames a full
        TX ring refused (TX-dropped), i.e. whether the other side kept up."""
        out = self.command("show fwd stats all")
        block = out.split(f"Forward statistics for port {port}", 1)
        m = re.search(r"RX-packets:\s+(\d+)\s+RX-dropped:\s+(\d+).*?"
                      r"TX-packets:\s+(\d+)\s+TX-dropped:\s+(\d+)", block[-1], re.S)
        if len(block) < 2 or not m:
            raise BenchError(f"no forward statistics for port {port} in:\n{out}")
        return {"rx_packets": int(m[1]), "rx_dropped": int(m[2]),
                "tx_packets": int(m[3]), "tx_dropped": int(m[4])}

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def log(self, tail: int = 4000) -> str:
        with self._cond:
            return self._out[-tail:].decode(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        """`quit` (ports closed cleanly, the vhost socket removed); signals if that hangs."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self._reader.join(5)
        self._log.close()
        # Each run has its own --file-prefix: its runtime directory would pile up.
        shutil.rmtree(f"/var/run/dpdk/{self.file_prefix}", ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> TestPmd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def frontend(sock: Path, mode: str, log_path: Path, queue_size: int,
             extra: Sequence[str] = (), nice: int = 0, vdev_extra: str = "") -> TestPmd:
    """DPDK's virtio_user front-end (a guest driver without a VM) on CPU 1, root namespace.

    queue_size sizes the vrings, but testpmd still posts only --rxd/--txd buffers on them,
    and without those options ethdev falls back to 512: both must be given.  vdev_extra:
    more virtio_user options (",packed_vq=1": packed rings).
    """
    vdev = f"net_virtio_user0,path={sock},queue_size={queue_size}{vdev_extra}"
    return TestPmd(FRONTEND_CPU, [vdev], [f"--forward-mode={mode}", f"--rxd={queue_size}",
                                          f"--txd={queue_size}", *extra], log_path, nice=nice)


# --- back-ends -----------------------------------------------------------------------------


class Backend(Protocol):
    log_path: Path

    @property
    def pid(self) -> int: ...

    def cpu_seconds(self) -> float: ...

    def log(self, tail: int = 4000) -> str: ...

    def stop(self, timeout: float = 10.0) -> int: ...


def log_tail(be: Backend, tail: int = 4000) -> str:
    """The back-end's log, also after stop() (bench.Process.log() needs the file open)."""
    return be.log_path.read_text(errors="replace")[-tail:]


def stop_backend(name: str, be: Backend) -> int:
    """Stops it; an exit status other than 0 is worth a look, so it is shown, not hidden."""
    rc = be.stop()
    if rc != 0:
        progress(f"  warning: {name} exited with {rc} when stopped; its log ends:\n"
                 f"{log_tail(be, 1500)}")
    return rc


def wait_listening(proc: Process, sock: Path, timeout: float = 20.0) -> None:
    """Until `proc` (possibly inside a namespace) listens on `sock`."""
    deadline = time.monotonic() + timeout
    while not listening_in(proc.pid, sock):
        if proc.proc.poll() is not None:
            raise BenchError(f"vhostd exited with {proc.proc.returncode}:\n{proc.log()}")
        if time.monotonic() > deadline:
            log = proc.log()  # before stop(): bench.Process.log() needs its file open
            proc.stop()
            raise BenchError(f"vhostd did not listen on {sock}:\n{log}")
        time.sleep(0.02)


def vhostd_argv(sock: Path, tap: str, extra: Sequence[str] = ()) -> list[str]:
    """`vhostd net` at the default log level, as a user runs it; `extra` from --vhostd-args."""
    return [sys.executable, "-m", "vhostd", "net", "--socket-path", str(sock), "--tap", tap,
            *extra]


def add_vhostd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vhostd-args", type=shlex.split, default=[],
                   help='more `vhostd net` options, e.g. "--poll-us 50" (default: none)')


def start_vhostd(ns: NetNs, sock: Path, tap: str, log_path: Path,
                 extra: Sequence[str] = ()) -> Process:
    """`vhostd net` inside the namespace (it creates the tap there) on CPU 0."""
    argv = ns.cmd(pinned(BACKEND_CPU, vhostd_argv(sock, tap, extra)))
    proc = Process(argv, log_path)
    wait_listening(proc, sock)
    return proc


def start_anchor(ns: NetNs, sock: Path, tap: str, log_path: Path) -> TestPmd:
    """DPDK's own vhost-user back-end bridged to a tap: net_vhost <-> net_tap, io forwarding,
    inside the namespace on CPU 0, with net_tap polling (real-time signals ignored)."""
    pmd = TestPmd(BACKEND_CPU, [f"net_vhost0,iface={sock}", f"net_tap0,iface={tap}"],
                  ["--forward-mode=io"], log_path, ns=ns, ignore_rt_signals=True)
    pmd.command("start")
    return pmd


def start_backend(name: str, ns: NetNs, sock: Path, tap: str, log_path: Path,
                  vhostd_extra: Sequence[str] = ()) -> Backend:
    sock.unlink(missing_ok=True)  # DPDK fails on a stale socket file
    if name == VHOSTD:
        return start_vhostd(ns, sock, tap, log_path, vhostd_extra)
    if name == ANCHOR:
        return start_anchor(ns, sock, tap, log_path)
    raise BenchError(f"unknown back-end {name}")


# --- tapbound ------------------------------------------------------------------------------


def build_tapbound(dest_dir: Path) -> Path:
    """Compiles bench/tapbound.c now, so a checkout needs no build step for it."""
    out = dest_dir / "tapbound"
    r = subprocess.run(["cc", "-O2", "-Wall", "-o", str(out), str(PACKAGE_DIR / "tapbound.c")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"cannot compile tapbound.c:\n{r.stderr}")
    return out


def tapbound_argv(ns: NetNs, binary: Path, cpu: int, mode: str, ifname: str, seconds: float,
                  size: int) -> list[str]:
    return ns.cmd(pinned(cpu, [str(binary), mode, ifname, f"{seconds:g}", str(size)]))


def parse_tapbound(out: str) -> dict[str, float]:
    m = re.search(r"frames=(\d+) errors=(\d+) seconds=([\d.]+) fps=(\d+) cpu=([\d.]+)", out)
    if not m:
        raise BenchError(f"no result from tapbound:\n{out}")
    frames, errors, seconds = int(m[1]), int(m[2]), float(m[3])
    # inject: an error is one frame the tap's full queue refused (sendmmsg reports a failure
    # on the first message of a call, which is then tried again): attempts = frames + errors.
    return {"frames": frames, "errors": errors, "seconds": seconds, "fps": float(m[4]),
            "attempts_per_s": (frames + errors) / seconds, "cpu_s": float(m[5])}


# --- contention on a shared machine ---------------------------------------------------------


def add_contention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-wait-pct", type=float, default=5.0,
                   help="a run whose back-end or front-end waited longer than this for its CPU "
                        "(other load) is run again (default 5)")
    p.add_argument("--retries", type=int, default=2,
                   help="how many times a contended run is repeated (default 2; the least "
                        "contended attempt is kept)")


def contention(row: Row) -> float:
    """The larger of be_wait_pct and fe_wait_pct: how much other load the run saw."""
    return max(float(row.get("be_wait_pct") or 0), float(row.get("fe_wait_pct") or 0))


def least_contended(run: Callable[[], Row], args: argparse.Namespace) -> Row:
    """`run()` again while another process kept its back-end or front-end off the CPU for
    more than --max-wait-pct of the window, up to --retries more times; the least contended
    attempt is kept, with `attempts` set.  A rate only compares when the CPU was ours."""
    best: Row | None = None
    for attempt in range(1, args.retries + 2):
        row = run()
        row["attempts"] = attempt
        if best is None or contention(row) < contention(best):
            best = row
        if contention(row) <= args.max_wait_pct:
            break
        progress(f"  contended ({contention(row):.0f}% of the window waiting for a CPU)"
                 + (": again" if attempt <= args.retries else ""))
    assert best is not None
    return best


# --- summaries -----------------------------------------------------------------------------


def ratio_by_round(runs: list[Row], key: str, num: str, den: str, **match: object) -> list[float]:
    """num/den of `key` for each round where both ran (with the same `match` fields)."""
    def pick(backend: str) -> dict[int, float]:
        return {r["round"]: r[key] for r in runs
                if r["backend"] == backend and all(r.get(k) == v for k, v in match.items())}
    a, b = pick(num), pick(den)
    return [a[n] / b[n] for n in sorted(a) if n in b and b[n]]


def median_of(runs: list[Row], key: str, backend: str, **match: object) -> float | None:
    values = [r[key] for r in runs if r["backend"] == backend and r.get(key) is not None
              and all(r.get(k) == v for k, v in match.items())]
    return statistics.median(values) if values else None


def rate_columns(runs: list[Row], size: int) -> Row:
    """The columns net-tx and net-rx share at one frame size: rate, Gbit/s, CPU and CPU per
    frame of each back-end and of the tap bound, with same-round ratios."""
    def med(key: str, backend: str) -> float | None:
        return median_of(runs, key, backend, size=size)

    def ratio(num: str, den: str) -> float | None:
        return median_or_none(ratio_by_round(runs, "mpps", num, den, size=size))

    return {
        "vhostd_mpps": med("mpps", VHOSTD),
        "dpdk_mpps": med("mpps", ANCHOR),
        "vhostd_vs_dpdk": ratio(VHOSTD, ANCHOR),
        "vhostd_gbps": med("gbps", VHOSTD),
        "dpdk_gbps": med("gbps", ANCHOR),
        "bound_mpps": med("mpps", BOUND),
        "vhostd_vs_bound": ratio(VHOSTD, BOUND),
        "dpdk_vs_bound": ratio(ANCHOR, BOUND),
        "vhostd_cpu_pct": med("cpu_pct", VHOSTD),
        "dpdk_cpu_pct": med("cpu_pct", ANCHOR),
        "vhostd_us_per_frame": med("cpu_us_per_frame", VHOSTD),
        "dpdk_us_per_frame": med("cpu_us_per_frame", ANCHOR),
        "bound_us_per_frame": med("cpu_us_per_frame", BOUND),
    }


def backends_median(runs: list[Row], key: str, size: int) -> float | None:
    """Median of `key` over the back-ends' runs (not the bound's) at one frame size."""
    return median_or_none([r[key] for r in runs if r["size"] == size and r["backend"] != BOUND])


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def int_list(spec: str) -> list[int]:
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise BenchError(f"not a comma-separated list of integers: {spec!r}") from None
