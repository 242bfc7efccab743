"""Per-device QoS (native/qos.c): the bucket arithmetic with explicit
times (a fake clock), and a ring that stops popping when its limit is hit.

The buckets follow QEMU's util/throttle.c: avg per second with a bucket of
avg/10, or max * max_length at avg plus a burst bucket of max/10 drained
at max.  Daemon-level tests (blkfe, testpmd) are in test_qos_daemon.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from vhostd.native import (QOS_BYTES, QOS_OPS, QOS_READ, QOS_WRITE, NativeError, NativeQos, QosGate,
                           QosLimit, qos_set_fake_clock)
from unavailable import missing
from vhd_helpers import Rig

S = 1_000_000_000
T0 = 1000 * S       # a fake clock far from 0 (0 means "the real clock")
BOTH = QOS_READ | QOS_WRITE


def run(q: NativeQos, seconds: float, *, cls: int = QOS_READ, size: int = 4096, start: int = T0,
        classes: int | None = None) -> list[int]:
    """A guest that always has a request waiting: each goes as soon as the
    buckets admit it.  Returns the admission times."""
    now, end, times = start, start + int(seconds * S), []
    while now < end:
        ok, until = q.admit(classes or cls, now)
        if not ok:
            assert until > now
            now = until
            continue
        q.charge(cls, now, size, q.op_cost(size))
        times.append(now)
    return times


def count(times: list[int], a: float, b: float, start: int = T0) -> int:
    return sum(1 for t in times if start + a * S <= t < start + b * S)


def test_iops_rate_and_default_bucket() -> None:
    """2000 IOPS: the first 100 ms worth (QEMU's avg/10) at once, then 2000/s exactly."""
    q = NativeQos([QosLimit(BOTH, QOS_OPS, 2000)])
    times = run(q, 10)
    assert count(times, 0, 1e-6) == 201       # the bucket: 200 ops + the one that fills it
    assert len(times) == 201 + 19999
    steady = [b - a for a, b in zip(times[201:], times[202:])]
    assert set(steady) == {S // 2000}


def test_bytes_rate_any_request_size() -> None:
    """20 MiB/s in 4 KiB and in 64 KiB requests: the same byte rate."""
    rate = 20 << 20
    for size in (4096, 65536, 1 << 20):
        q = NativeQos([QosLimit(BOTH, QOS_BYTES, rate)])
        times = run(q, 5, size=size)
        moved = count(times, 1, 5) * size
        assert moved == pytest.approx(4 * rate, rel=size / (4 * rate) + 1e-6), size


def test_burst_then_base_rate() -> None:
    """iops 1000, max 5000 for 2 s: a bucket of 10000 ops filled at 5000 - 1000
    per second, so 5000/s for 2.5 s, then 1000/s (QEMU's semantics)."""
    q = NativeQos([QosLimit(BOTH, QOS_OPS, 1000, max=5000, max_length=2)])
    times = run(q, 8)
    assert count(times, 0.2, 2.2) == pytest.approx(2 * 5000, rel=0.01)
    assert count(times, 3, 8) == pytest.approx(5 * 1000, rel=0.01)
    # The burst bucket caps the burst's own rate: no 10000 ops at once.
    assert count(times, 0, 0.01) <= 5000 // 10 + 50 + 1


def test_burst_recovers_after_idle() -> None:
    q = NativeQos([QosLimit(BOTH, QOS_OPS, 1000, max=5000, max_length=1)])
    first = run(q, 4)
    assert count(first, 3, 4) == pytest.approx(1000, rel=0.01)
    # 20 s idle refill the bucket: the next seconds burst again.
    later = run(q, 1, start=T0 + 24 * S)
    assert count(later, 0.1, 1, start=T0 + 24 * S) == pytest.approx(0.9 * 5000, rel=0.02)


def test_size_iops_sec() -> None:
    """size_iops_sec 4096: a 16 KiB request counts as 4, 4 KiB and less as 1."""
    q = NativeQos([QosLimit(BOTH, QOS_OPS, 1000)], op_size=4096)
    assert q.op_cost(16384) == 4
    assert q.op_cost(4096) == q.op_cost(512) == 1
    assert q.op_cost(6144) == 1.5
    big = run(q, 5, size=16384)
    assert count(big, 1, 5) == pytest.approx(4 * 250, rel=0.005)
    q2 = NativeQos([QosLimit(BOTH, QOS_OPS, 1000)], op_size=4096)
    small = run(q2, 5, size=2048)
    assert count(small, 1, 5) == pytest.approx(4 * 1000, rel=0.005)


def test_read_and_write_limits_are_separate() -> None:
    q = NativeQos([QosLimit(QOS_READ, QOS_OPS, 100), QosLimit(QOS_WRITE, QOS_OPS, 1000)])
    reads = run(q, 2, cls=QOS_READ)
    assert count(reads, 1, 2) == 100
    # Reads have exhausted theirs; writes are not held by it.
    assert q.admit(QOS_WRITE, T0 + 2 * S)[0]
    assert not q.admit(QOS_READ, T0 + 2 * S)[0] or count(reads, 1.99, 2) >= 0
    writes = run(q, 1, cls=QOS_WRITE, start=T0 + 2 * S)
    assert count(writes, 0.5, 1, start=T0 + 2 * S) == 500


def test_total_counts_both() -> None:
    q = NativeQos([QosLimit(BOTH, QOS_BYTES, 1 << 20)])
    t = T0
    n = 0
    while t < T0 + 3 * S:
        ok, until = q.admit(BOTH, t)
        if not ok:
            t = until
            continue
        q.charge(QOS_READ if n % 2 else QOS_WRITE, t, 4096)
        n += 1
    assert n * 4096 == pytest.approx(3 * (1 << 20) + (1 << 20) // 10, rel=0.01)


def test_group_shares_one_budget() -> None:
    """Two devices of one group charge the same buckets: together they get
    the group's rate, each about half when both are busy."""
    q = NativeQos([QosLimit(BOTH, QOS_OPS, 1000)])
    now, got = T0, [0, 0]
    turn = 0
    while now < T0 + 4 * S:
        ok, until = q.admit(BOTH, now)
        if not ok:
            now = until
            continue
        q.charge(QOS_READ, now, 4096)
        got[turn] += 1
        turn ^= 1
    assert sum(got) == pytest.approx(4 * 1000 + 100, abs=2)
    assert abs(got[0] - got[1]) <= 1


def test_changed_limit_carries_what_was_used() -> None:
    """A new limit neither hands out a fresh burst nor stalls longer than its bucket."""
    old = NativeQos([QosLimit(BOTH, QOS_OPS, 2000)])
    qos_set_fake_clock(T0 + 2 * S)
    try:
        run(old, 2)                       # bucket fully used at T0 + 2 s
        lower = NativeQos([QosLimit(BOTH, QOS_OPS, 500)], prev=old)
        higher = NativeQos([QosLimit(BOTH, QOS_OPS, 8000)], prev=old)
        fresh = NativeQos([QosLimit(BOTH, QOS_OPS, 500)])
    finally:
        qos_set_fake_clock(0)
    at = T0 + 2 * S
    assert count(run(lower, 1, start=at), 0, 1e-6, start=at) == 1
    assert count(run(fresh, 1, start=at), 0, 1e-6, start=at) == 51
    assert count(run(higher, 0.5, start=at), 0.1, 0.5, start=at) == pytest.approx(0.4 * 8000, abs=1)


@pytest.mark.parametrize("limit, why", [
    (QosLimit(BOTH, QOS_OPS, 100, max=50), "max below avg"),
    (QosLimit(BOTH, QOS_OPS, 0, max=50), "max without avg"),
    (QosLimit(BOTH, QOS_OPS, 0, max_length=5), "max_length without avg"),
    (QosLimit(BOTH, QOS_OPS, 10**13), "rate too large"),
    (QosLimit(0, QOS_OPS, 100), "no class"),
])
def test_refused_limits(limit: QosLimit, why: str) -> None:
    with pytest.raises(NativeError):
        NativeQos([limit])


def test_unlimited_has_no_buckets() -> None:
    q = NativeQos([QosLimit(BOTH, QOS_OPS, 0)])
    for i in range(10000):
        assert q.admit(BOTH, T0) == (True, 0)
        q.charge(QOS_READ, T0, 1 << 20)


# --- a ring under a limit (fake clock) -----------------------------------------

def popped(rig: Rig) -> int:
    """Chains taken from the avail ring (a packed ring's position counts
    descriptors: the requests here are 3 each, header, data and status)."""
    if rig.packed:
        pos = rig.vring.last_avail_idx & 0x7FFF
        assert pos % 3 == 0
        return pos // 3
    return rig.vring.last_avail_idx


@pytest.fixture(params=["split", "packed"])
def rig(rig_factory: Callable[..., Rig], request: pytest.FixtureRequest) -> Rig:
    """Both ring layouts: the gate is asked before vhd_vring_pop, whichever it pops."""
    return rig_factory(num=128, packed=request.param == "packed")


@pytest.fixture
def fake_clock() -> Iterator[Callable[[int], None]]:
    if not qos_set_fake_clock(T0):
        missing("needs the test build (VHOSTD_TEST_HOOKS=1, as ./dev setup builds it)")
    def set_clock(ns: int) -> None:
        qos_set_fake_clock(ns)

    yield set_clock
    qos_set_fake_clock(0)


def test_ring_stops_popping_and_resumes(rig: Rig, fake_clock: Callable[[int], None]) -> None:
    """10 IOPS (a bucket of 0.1 s = 1 op): two requests go, the rest wait in
    the avail ring, untouched, until the clock moves on."""
    q = NativeQos([QosLimit(BOTH, QOS_OPS, 10)])
    gate = QosGate(BOTH)
    rig.vring.set_qos(gate, q)
    reqs = [rig.read_req(i, 512) for i in range(6)]
    assert rig.process() == 2
    assert popped(rig) == 2
    assert [rig.status_of(r) for r in reqs] == [0, 0] + [0xFF] * 4
    assert rig.process() == 0                         # still throttled: nothing popped
    assert gate.stats(T0).throttles == 1
    fake_clock(T0 + S // 10)
    assert rig.process() == 1
    fake_clock(T0 + 3 * S // 10)
    assert rig.process() == 2
    assert gate.stats(T0 + 3 * S // 10) == type(gate.stats())(3, 3 * S // 10)
    assert popped(rig) == 5
    # Unlimited again: the rest goes at once.
    rig.vring.set_qos(gate, None)
    assert rig.process() == 1
    assert [rig.status_of(r) for r in reqs] == [0] * 6
    assert rig.broken == 0
    gate.close()
    q.close()


@pytest.mark.parametrize("iops, lease", [(1_000_000, 1024), (2000, 50), (400, 1)])
def test_leasing_gate_leases_by_the_room_left(rig: Rig, fake_clock: Callable[[int], None], iops: int,
                                              lease: int) -> None:
    """A leasing gate (net's) looks at the buckets once per lease: a quarter
    of the room left, so far from a limit rarely (at most every 1024
    requests) and near one at every request.  The clock does not move; 40
    requests all go, inside the bucket (2000 IOPS: one look with room 200,
    a lease of 50; 400 IOPS, a bucket of 40: leases of 10, 7, 5, 4, 3, 2, 2,
    then 1 as the room runs out)."""
    q = NativeQos([QosLimit(BOTH, QOS_OPS, iops)])
    gate = QosGate(BOTH, leasing=True)
    assert gate.lease() == 1
    rig.vring.set_qos(gate, q)
    for i in range(40):
        rig.read_req(i, 512)
    assert rig.process() == 40
    assert gate.lease() == lease
    assert gate.stats(T0).throttles == 0
    rig.vring.set_qos(gate, None)
    q.close()
    gate.close()


def test_blk_gate_never_leases(rig: Rig, fake_clock: Callable[[int], None]) -> None:
    """blk's gate (not leasing) looks at the buckets before every request, however far the limit."""
    q = NativeQos([QosLimit(BOTH, QOS_OPS, 1_000_000)])
    gate = QosGate(BOTH)
    rig.vring.set_qos(gate, q)
    for i in range(40):
        rig.read_req(i, 512)
    assert rig.process() == 40
    assert gate.lease() == 1
    rig.vring.set_qos(gate, None)
    q.close()
    gate.close()


def test_ring_limit_counts_bytes_of_reads_only(rig: Rig, fake_clock: Callable[[int], None]) -> None:
    """read_bytes_sec 40960 (a bucket of 4 KiB): reads are held by their
    size, writes are not counted."""
    q = NativeQos([QosLimit(QOS_READ, QOS_BYTES, 40960)])
    gate = QosGate(BOTH)
    rig.vring.set_qos(gate, q)
    for i in range(20):
        rig.write_req(i, b"w" * 4096)
    assert rig.process() == 20
    for i in range(3):
        rig.read_req(i, 4096)
    assert rig.process() == 2                 # the bucket, and the read that fills it
    fake_clock(T0 + S // 10 - 1)
    assert rig.process() == 0
    fake_clock(T0 + S // 10)
    assert rig.process() == 1
    rig.read_req(0, 8192)
    rig.read_req(0, 512)
    fake_clock(T0 + 2 * S // 10)
    assert rig.process() == 1                 # 8 KiB: 0.2 s of budget
    fake_clock(T0 + 3 * S // 10)
    assert rig.process() == 0
    fake_clock(T0 + 4 * S // 10)
    assert rig.process() == 1
    q.close()
    gate.close()


def test_ring_uring_engine_throttles(rig: Rig, fake_clock: Callable[[int], None]) -> None:
    q = NativeQos([QosLimit(BOTH, QOS_OPS, 10)])
    gate = QosGate(BOTH)
    rig.vring.set_qos(gate, q)
    reqs = [rig.read_req(i, 512) for i in range(5)]
    rig.process_uring()
    assert popped(rig) == 2
    fake_clock(T0 + S)               # a full bucket again (1 op) plus the one that fills it
    rig.process_uring()
    assert popped(rig) == 4
    fake_clock(T0 + S + S // 10)
    rig.process_uring()
    assert popped(rig) == 5
    assert [rig.status_of(r) for r in reqs] == [0] * 5
    q.close()
    gate.close()

