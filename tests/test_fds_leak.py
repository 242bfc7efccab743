"""No fd or mapping leaks in the daemon across sessions: after many
connect / negotiate / SET_MEM_TABLE / start rings / I/O / disconnect
cycles (and cycles that end in protocol errors), the daemon's open fds
and memfd mappings are back to their baseline."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable

import pytest

from vhd_helpers import Daemon, attach
from vhostd.frontend import VIRTIO_BLK_S_OK, DriverRing, GuestRam
from vhostd.protocol.constants import Request
from vhostd.protocol.messages import MemRegion, U64, VringState

pytestmark = pytest.mark.usefixtures("watchdog")

CYCLES = 50


def settle(d: Daemon, fds: int, maps: int, timeout: float = 5.0) -> tuple[int, int]:
    """Waits until the daemon is back to (fds, maps), or the timeout; returns the last counts."""
    deadline = time.monotonic() + timeout
    while True:
        now = d.fd_count(), d.memfd_maps()
        if now == (fds, maps) or time.monotonic() > deadline:
            return now
        time.sleep(0.01)


def baseline(d: Daemon) -> tuple[int, int]:
    time.sleep(0.1)
    return d.fd_count(), d.memfd_maps()


def test_no_leak_over_full_sessions(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(num_queues=2)
    fds0, maps0 = baseline(d)
    assert maps0 == 0
    peak_maps = 0
    for i in range(CYCLES):
        a = attach(d, queues=2, num=32, ram_sizes=(1 << 18, 1 << 18))
        try:
            blk = a.blk(i % 2)
            assert blk.write(i, bytes([i]) * 512).status == VIRTIO_BLK_S_OK
            assert blk.read(i, 512).data == bytes([i]) * 512
            if i % 10 == 0:       # memory swap while rings run: the old mappings go
                a.fe.send(Request.SET_MEM_TABLE, a.ram.mem_table().pack(), a.ram.fds())
            if i % 7 == 0:        # a stopped ring and a replaced kick fd
                a.fe.get_vring_base(1)
                a.fe.send(Request.SET_VRING_KICK, U64(1).pack(), [a.rings[1].kick_fd])
            assert a.fe.get_u64(Request.GET_QUEUE_NUM) == 2
            peak_maps = max(peak_maps, d.memfd_maps())
            assert d.fd_count() > fds0     # sanity: the session's fds are visible
        finally:
            a.close()
        # Each session must be fully released before the next one starts.
        assert settle(d, fds0, maps0) == (fds0, maps0), f"after cycle {i}"
    assert peak_maps == 2     # the two regions, mapped once each
    assert d.alive


def test_no_leak_over_rejected_sessions(daemon_factory: Callable[..., Daemon]) -> None:
    """Sessions that end in protocol errors with fds attached, or in the
    middle of setting up memory and rings."""
    d = daemon_factory()
    fds0, maps0 = baseline(d)
    for i in range(CYCLES // 2):
        fe = d.connect()
        ram = GuestRam([1 << 16, 1 << 16])
        ring = DriverRing(ram, 0, 16)
        try:
            fe.negotiate(~0, ~0)
            kind = i % 5
            if kind == 0:    # fd count mismatch: fds of the rejected message closed
                fe.send(Request.SET_MEM_TABLE, ram.mem_table().pack(), ram.fds()[:1])
            elif kind == 1:  # bad region (overlap) after a good table is in place
                fe.set_mem_table(ram)
                regions = ram.mem_table().regions
                bad = type(ram.mem_table())((regions[0], MemRegion(regions[0].guest_phys_addr, 4096,
                                                                   regions[1].userspace_addr, 0)))
                fe.send(Request.SET_MEM_TABLE, bad.pack(), ram.fds())
            elif kind == 2:  # ring fds in place, then garbage
                fe.set_mem_table(ram)
                fe.start_ring(ring)
                fe.send_raw(struct.pack("<III", 99, 1, 0), [ring.kick_fd, ring.call_fd])
            elif kind == 3:  # a kick fd that cannot be watched
                fe.set_mem_table(ram)
                fe.send(Request.SET_VRING_KICK, U64(0).pack(), [ram.fds()[0]])
                fe.send(Request.SET_VRING_NUM, VringState(0, 3).pack())
            else:            # hang up in the middle of a started ring
                fe.set_mem_table(ram)
                fe.start_ring(ring)
                fe.send(Request.GET_FEATURES)
                fe.close()
            if kind != 4:
                assert fe.is_closed(5)
        finally:
            fe.close()
            ring.close()
            ram.close()
        assert settle(d, fds0, maps0) == (fds0, maps0), f"after cycle {i} (kind {i % 5})"
    assert d.alive
    assert len(d.lines("ERROR")) == 4 * (CYCLES // 2) // 5


def test_daemon_fds_are_close_on_exec(daemon: Daemon) -> None:
    """Nothing the daemon opens (sockets, received fds, eventfds) may leak
    into a child process it might spawn."""
    a = attach(daemon)
    try:
        assert a.blk().flush().status == VIRTIO_BLK_S_OK
        leaky = []
        for name in os.listdir(f"/proc/{daemon.pid}/fd"):
            fd = int(name)
            if fd <= 2:
                continue
            with open(f"/proc/{daemon.pid}/fdinfo/{fd}") as f:
                flags = next(int(ln.split()[1], 8) for ln in f if ln.startswith("flags:"))
            if not flags & 0o2000000:   # O_CLOEXEC
                leaky.append((fd, os.readlink(f"/proc/{daemon.pid}/fd/{fd}")))
        assert leaky == []
    finally:
        a.close()
