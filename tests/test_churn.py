"""Front-end churn: 1000 connect / negotiate / disconnect cycles, some cut
off in the middle of SET_MEM_TABLE, some with rings running and I/O in
flight, leave no growth in the daemon's fds, memfd mappings or memory."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

import struct

from vhd_helpers import Attached, Daemon, attach
from vhostd.frontend import Buf, GuestRam
from vhostd.protocol.constants import Request
from vhostd.protocol.messages import encode_request

pytestmark = pytest.mark.usefixtures("watchdog")

CYCLES = 1000


def _rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _settled(d: Daemon, want: tuple[int, int], timeout: float = 5.0) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    while (now := (d.fd_count(), d.memfd_maps())) != want and time.monotonic() < deadline:
        time.sleep(0.01)
    return now


def _cut_in_set_mem_table(d: Daemon, ram: GuestRam) -> None:
    fe = d.connect()
    fe.negotiate(~0, ~0)
    msg = encode_request(Request.SET_MEM_TABLE, ram.mem_table().pack())
    fe.send_raw(msg[:20], ram.fds())          # header + part of the payload, with the fds
    fe.close()


def _negotiate_only(d: Daemon, ram: GuestRam) -> None:
    fe = d.connect()
    fe.negotiate(~0, ~0)
    fe.close()


def _rings_running(d: Daemon, ram: GuestRam) -> None:
    a = attach(d, queues=2, num=16, ram_sizes=(1 << 18,))
    # Requests queued without waiting: the disconnect lands with I/O in flight.
    for s in range(5):
        a.rings[0].submit(blk_request(a, s))
    a.rings[0].kick()
    a.close()


def blk_request(a: Attached, sector: int) -> list[Buf]:
    hdr = a.ram.alloc(16)
    a.ram.write(hdr, struct.pack("<IIQ", 0, 0, sector))
    data, st = a.ram.alloc(512, 512), a.ram.alloc(1, 1)
    return [Buf(hdr, 16), Buf(data, 512, writable=True), Buf(st, 1, writable=True)]


def test_thousand_cycles_leave_no_growth(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(num_queues=2)
    ram = GuestRam([1 << 18, 1 << 18])
    steps = [_negotiate_only, _cut_in_set_mem_table, _rings_running]
    # Warm up (imports, allocator pools), then take the baseline.
    for i in range(30):
        steps[i % 3](d, ram)
    time.sleep(0.2)
    fds0, maps0, rss0 = d.fd_count(), d.memfd_maps(), _rss_kib(d.pid)
    t0 = time.monotonic()
    for i in range(CYCLES):
        steps[i % 3](d, ram)
    elapsed = time.monotonic() - t0
    assert _settled(d, (fds0, maps0)) == (fds0, maps0)
    growth = _rss_kib(d.pid) - rss0
    print(f"\n{CYCLES} cycles in {elapsed:.1f} s; RSS growth {growth} KiB")
    assert growth < 8 * 1024, f"RSS grew by {growth} KiB over {CYCLES} cycles"
    assert d.alive
    assert "closing connection" in d.log()      # the cut-off SET_MEM_TABLE was seen as such
    ram.close()
