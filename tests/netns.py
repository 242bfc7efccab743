"""Network namespaces for tests that need taps: all their traffic stays in
a namespace the test created and deletes.

    with netns("dpdk") as ns:                 # ip netns add vhd-dpdk-<pid>-<n>
        d = vhostd_net(ns, tmp_path, "vtap0")  # vhostd runs inside ns
        ns.read_stat("vtap0", "rx_packets")

Processes started with ``NetNs.popen`` are killed (by PID) when the
context ends, before the namespace is deleted.  ``ip netns exec`` execs the
command, so a Popen's pid is the command's own pid.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vhostd_proc import Vhostd  # noqa: E402

_counter = itertools.count()


def netns_available() -> str | None:
    """None when namespaces and taps can be used here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return None


class NetNs:
    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[subprocess.Popen[Any]] = []
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)

    def cmd(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 30,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """Runs cmd inside the namespace; output captured as text."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.cmd(cmd), check=check, timeout=timeout, **kw)

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Starts cmd inside the namespace; killed at cleanup if still running."""
        p = subprocess.Popen(self.cmd(cmd), **kw)
        self.procs.append(p)
        return p

    def read_stat(self, ifname: str, stat: str) -> int:
        """/sys/class/net/IF/statistics/STAT as seen inside the namespace
        (``ip netns exec`` mounts the namespace's own sysfs)."""
        out = self.run(["cat", f"/sys/class/net/{ifname}/statistics/{stat}"]).stdout
        return int(out)

    def read_stats(self, ifname: str, *stats: str) -> dict[str, int]:
        """Several counters in one exec (so they are read close together)."""
        paths = [f"/sys/class/net/{ifname}/statistics/{s}" for s in stats]
        out = self.run(["cat", *paths]).stdout.split()
        return {s: int(v) for s, v in zip(stats, out, strict=True)}

    def quiet(self) -> None:
        """No IPv6 in the namespace: links that come up send no router
        solicitations or MLD reports, so frame counts are exact."""
        self.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                  "net.ipv6.conf.default.disable_ipv6=1"], check=False)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []
        subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True,
                       timeout=10)


@contextmanager
def netns(name_prefix: str, quiet: bool = True) -> Iterator[NetNs]:
    """A fresh namespace ``vhd-<prefix>-<pid>-<n>``, deleted on exit."""
    ns = NetNs(f"vhd-{name_prefix}-{os.getpid()}-{next(_counter)}")
    try:
        if quiet:
            ns.quiet()
        yield ns
    finally:
        ns.close()


def vhostd_net(ns: NetNs, tmp: Path, tap: str, *extra: str, name: str = "net0") -> Vhostd:
    """``vhostd net`` running inside ns (so its tap is created there),
    listening on a socket file reachable from the root namespace."""
    sock = tmp / f"{name}.sock"
    return Vhostd(["net", "--name", name, "--socket-path", str(sock), "--tap", tap, *extra],
                  sock, tmp / f"{name}.log", prefix=ns.cmd([]))
