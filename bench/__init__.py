"""vhostd benchmarks: a registry that `python -m bench` discovers, and helpers they share.

A benchmark is a module in this package that defines ``BENCHMARK = Benchmark(...)``; its
``run(args)`` returns rows (dicts).  The runner prints the rows' scalar values as a table and
writes all of them (nested lists and dicts too) to a JSON file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Sequence

Row = dict[str, Any]

PACKAGE_DIR = Path(__file__).resolve().parent
REPO = PACKAGE_DIR.parent
RESULTS_DIR = PACKAGE_DIR / "results"


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Benchmark:
    name: str
    help: str
    run: Callable[[argparse.Namespace], list[Row]]
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    # Why it cannot run on this machine (e.g. a missing tool), or None.
    unavailable: Callable[[], str | None] = _always_available


class BenchError(RuntimeError):
    """A benchmark run failed; the message carries the logs needed to see why."""


def discover() -> dict[str, Benchmark]:
    """Every module's BENCHMARK, by name: adding a benchmark touches no shared list."""
    found: dict[str, Benchmark] = {}
    for info in sorted(pkgutil.iter_modules([str(PACKAGE_DIR)]), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        bench = getattr(importlib.import_module(f"{__name__}.{info.name}"), "BENCHMARK", None)
        if isinstance(bench, Benchmark):
            found[bench.name] = bench
    return found


# --- output ----------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        # Enough digits to compare, not so many that the table hides the magnitude.
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_table(rows: Sequence[Row]) -> str:
    """Rows as an aligned text table; nested values (lists, dicts) go only to the JSON."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if not isinstance(v, (list, dict)) and k not in columns]
    cells = [columns] + [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if n else c.ljust(w) for n, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def host_info() -> dict[str, Any]:
    """What a later reader needs to tell two result files apart."""
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def write_results(name: str, args: argparse.Namespace, rows: list[Row], started: float,
                  results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    path = results_dir / f"{name}-{stamp}.json"
    doc = {
        "benchmark": name,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "args": {k: v for k, v in vars(args).items() if not callable(v)},
        "host": host_info(),
        "rows": rows,
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def progress(message: str) -> None:
    """Progress goes to stderr so stdout holds only the tables."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- processes we start ----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads, living and exited) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        # comm (field 2) may contain spaces and parentheses: split after the last ')'.
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def unix_listening(path: Path) -> bool:
    """Whether some socket listens on `path`, read from /proc/net/unix.

    Connecting to test it would start a vhost-user session the back-end then has to tear
    down; the file existing alone does not mean listen() has happened.  vhostd binds and
    listens under a temporary name (`PATH.PID~`) and renames it to PATH: /proc/net/unix keeps
    the name it was bound to, so that name listening and PATH existing count too.
    """
    target = str(path)
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            # Num RefCount Protocol Flags Type St Inode Path; 0x10000 is __SO_ACCEPTCON.
            if len(parts) < 8 or not int(parts[3], 16) & 0x10000:
                continue
            bound = parts[7]
            if bound == target:
                return True
            if (bound.startswith(target + ".") and bound.endswith("~")
                    and bound[len(target) + 1:-1].isdigit() and path.is_socket()):
                return True
    return False


class Process:
    """A back-end we started, its output in a log file; stopped by its own PID only."""

    def __init__(self, argv: Sequence[str], log_path: Path, socket: Path | None = None,
                 timeout: float = 20.0) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        if socket is not None:
            try:
                self._wait_listening(socket, timeout)
            except BaseException:
                self.stop()
                raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_listening(self, socket: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not unix_listening(socket):
            if self.proc.poll() is not None:
                raise BenchError(f"{self.argv[0]} exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.argv[0]} did not listen on {socket}:\n{self.log()}")
            time.sleep(0.02)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def log(self, tail: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-tail:]

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
