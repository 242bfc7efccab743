"""Per-device QoS: the limits' names and validation, and which buckets a
device's rings use.

Names are libvirt's (``<iotune>`` for disks, ``<bandwidth>`` spirit for
NICs), semantics QEMU's throttling (util/throttle.c); the buckets live in
C (native/qos.c) and are checked by the rings' workers before each pop.

- blk: ``total_bytes_sec``, ``read_bytes_sec``, ``write_bytes_sec``,
  ``total_iops_sec``, ``read_iops_sec``, ``write_iops_sec``, each with
  ``*_max`` (burst rate) and ``*_max_length`` (seconds), ``size_iops_sec``,
  and ``group``: devices naming the same group share one set of buckets.
- net: ``tx_bytes_sec``, ``rx_bytes_sec``, ``tx_packets_sec``,
  ``rx_packets_sec`` with ``*_max`` and ``*_max_length``.  TX is what the
  guest sends, RX what it receives; bytes are frame bytes (no virtio
  header).

0 (or leaving a key out) is unlimited.  A device without any limit has no
gate on its rings: it costs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vhostd.native import (QOS_BYTES, QOS_MAX_LENGTH, QOS_MAX_RATE, QOS_OPS, QOS_READ, QOS_WRITE, GateStats,
                           NativeQos, NativeVring, QosGate, QosLimit, Task)

BOTH = QOS_READ | QOS_WRITE
GROUP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# base key -> (classes, unit)
BLK_BASES: dict[str, tuple[int, int]] = {
    "total_bytes_sec": (BOTH, QOS_BYTES), "read_bytes_sec": (QOS_READ, QOS_BYTES),
    "write_bytes_sec": (QOS_WRITE, QOS_BYTES), "total_iops_sec": (BOTH, QOS_OPS),
    "read_iops_sec": (QOS_READ, QOS_OPS), "write_iops_sec": (QOS_WRITE, QOS_OPS),
}
NET_BASES: dict[str, tuple[int, int]] = {
    "tx_bytes_sec": (QOS_WRITE, QOS_BYTES), "rx_bytes_sec": (QOS_READ, QOS_BYTES),
    "tx_packets_sec": (QOS_WRITE, QOS_OPS), "rx_packets_sec": (QOS_READ, QOS_OPS),
}


def keys_for(kind: str) -> list[str]:
    """Every numeric key a device of this kind ("blk", "net") takes."""
    bases = BLK_BASES if kind == "blk" else NET_BASES
    out = [k for b in bases for k in (b, f"{b}_max", f"{b}_max_length")]
    return out + (["size_iops_sec"] if kind == "blk" else [])


class LimitError(ValueError):
    """A refused limit; ``key`` is the one at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class Limits:
    """A device's limits: the non-zero keys, and its group (blk)."""

    kind: str = "blk"
    values: tuple[tuple[str, int], ...] = ()
    group: str | None = None

    def get(self, key: str) -> int:
        return dict(self.values).get(key, 0)

    @property
    def limited(self) -> bool:
        return any(self.get(b) for b in (BLK_BASES if self.kind == "blk" else NET_BASES))

    def native(self) -> tuple[list[QosLimit], int]:
        """The C buckets' parameters, and size_iops_sec."""
        bases = BLK_BASES if self.kind == "blk" else NET_BASES
        out = [QosLimit(classes, unit, self.get(b), self.get(f"{b}_max"), self.get(f"{b}_max_length"))
               for b, (classes, unit) in bases.items() if self.get(b)]
        return out, self.get("size_iops_sec")

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.values)
        if self.group is not None:
            d["group"] = self.group
        return d

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.values]
        if self.group is not None:
            parts.append(f"group={self.group}")
        return " ".join(parts) or "unlimited"

    def merged(self, changes: Mapping[str, Any]) -> Limits:
        """These limits with some keys changed (``vhostd limit``), validated."""
        items: dict[str, Any] = self.as_dict()
        items.update(changes)
        return parse_limits(self.kind, items)


def parse_limits(kind: str, items: Mapping[str, Any]) -> Limits:
    """Validates a device's limits (a TOML table, or ``vhostd limit``'s
    key=value pairs); raises LimitError naming the key.  The rules are
    QEMU's (throttle_is_valid) so that libvirt's settings carry over."""
    allowed = keys_for(kind)
    values: dict[str, int] = {}
    group: str | None = None
    for key, value in items.items():
        if key == "group" and kind == "blk":
            if value is not None and (not isinstance(value, str) or not GROUP_RE.fullmatch(value)):
                raise LimitError(key, f"{value!r} is not a group name (letters, digits, '_', '.', '-')")
            group = value or None
            continue
        if key not in allowed:
            extra = ", group" if kind == "blk" else ""
            raise LimitError(key, f"unknown limit for a {kind} device (allowed: {', '.join(allowed)}{extra})")
        if isinstance(value, bool) or not isinstance(value, int):
            raise LimitError(key, f"{value!r} is not a whole number")
        top = QOS_MAX_LENGTH if key.endswith("_max_length") else QOS_MAX_RATE
        if not 0 <= value <= top:
            raise LimitError(key, f"{value} is not in 0..{top} (0: unlimited)")
        if value:
            values[key] = value
    bases = BLK_BASES if kind == "blk" else NET_BASES
    for base in bases:
        avg, mx, length = values.get(base, 0), values.get(f"{base}_max", 0), values.get(f"{base}_max_length", 0)
        if mx and not avg:
            raise LimitError(f"{base}_max", f"a burst needs {base} (the rate it returns to)")
        if mx and mx < avg:
            raise LimitError(f"{base}_max", f"{mx} is below {base} {avg}")
        if length and not mx:
            raise LimitError(f"{base}_max_length", f"needs {base}_max (the burst it lasts for)")
    if kind == "blk":
        for what in ("bytes", "iops"):
            total = f"total_{what}_sec"
            for part in (f"read_{what}_sec", f"write_{what}_sec"):
                if values.get(total) and values.get(part):
                    raise LimitError(part, f"cannot be used with {total} (QEMU and libvirt refuse both)")
    return Limits(kind, tuple(sorted(values.items())), group)


# --- buckets and rings -----------------------------------------------------------

@dataclass
class Budget:
    """One set of buckets: a device's own, or a group's (shared)."""

    limits: Limits
    native: NativeQos | None = None      # None: unlimited
    members: set[str] = field(default_factory=set)

    def rebuild(self, limits: Limits) -> NativeQos | None:
        """New buckets for new limits, carrying over what was used; returns
        the old ones (free them once no ring uses them)."""
        old = self.native
        self.limits = limits
        self.native = None
        if limits.limited:
            lims, op_size = limits.native()
            self.native = NativeQos(lims, op_size, old)
        return old


class DeviceQos:
    """A device's side of QoS: its budget, and one gate per ring (the
    gates outlive front-end connections, so the counters do too)."""

    def __init__(self, name: str, kind: str) -> None:
        self.name = name
        self.kind = kind
        self.budget = Budget(Limits(kind))
        self.gates: dict[int, QosGate] = {}

    @property
    def limits(self) -> Limits:
        return self.budget.limits

    def gate(self, index: int, classes: int) -> QosGate:
        g = self.gates.get(index)
        if g is None:
            # net frames go by leases (one clock read and bucket update per lease)
            g = self.gates[index] = QosGate(classes, leasing=self.kind != "blk")
        return g

    def bind(self, vring: NativeVring, index: int, classes: int) -> None:
        """A ring about to start (set up, not yet on a worker)."""
        if not classes:
            return
        vring.set_qos(self.gate(index, classes), self.budget.native)

    def rebind(self, running: Iterable[tuple[int, Task]]) -> None:
        """Moves running rings to the budget's current buckets, each between
        two turns of its worker (blocks the caller that long)."""
        for index, task in running:
            g = self.gates.get(index)
            if g is not None:
                task.set_qos(g, self.budget.native)

    def stats(self) -> GateStats:
        total = GateStats(0, 0)
        for g in self.gates.values():
            s = g.stats()
            total = GateStats(total.throttles + s.throttles, total.throttled_ns + s.throttled_ns)
        return total

    def close(self) -> None:
        """Only once no ring runs."""
        for g in self.gates.values():
            g.close()
        self.gates.clear()
