"""Which worker thread serves which ring: the placement policy.  The
threads themselves are native (native/sched.c); a ring never knows which
one runs it.

The daemon has a fixed set of workers: by default one per CPU it may run
on (its affinity mask, or ``[daemon] cpu_affinity``, which also pins
worker i to the i-th CPU of that list).  When a ring starts it goes to the
allowed worker serving the fewest rings of its device, then the fewest
rings overall, so the queues of one device spread over the workers and
load evens out; a device's ``cpu_affinity`` restricts it to the workers
pinned to those CPUs.  A stopped ring is placed again when it restarts.
Rings whose back-end blocks (the synchronous blk engine) get a thread of
their own instead.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vhostd.native import EXCLUSIVE_WORKER, NativeScheduler, NativeVring, Task


class SchedulerError(ValueError):
    pass


@dataclass(frozen=True)
class SchedulerConfig:
    workers: int = 0                 # 0: one per CPU (cpus, else the affinity mask)
    cpus: tuple[int, ...] = ()       # pin worker i to cpus[i % len(cpus)]; (): unpinned

    def worker_count(self) -> int:
        return self.workers or len(self.cpus) or len(os.sched_getaffinity(0))


@dataclass
class Placement:
    """A started ring: its task and whose load it counts in."""

    task: Task
    owner: str
    worker: int

    def detach(self) -> None:
        """Blocks until the worker lets go of the ring (run off the event loop)."""
        self.task.detach()


@dataclass
class Scheduler:
    config: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        n = self.config.worker_count()
        self.native = NativeScheduler(n, self.config.cpus)
        self.home: list[int | None] = [self.config.cpus[i % len(self.config.cpus)] if self.config.cpus
                                       else None for i in range(n)]
        self._load = [0] * n
        self._by_owner: dict[str, Counter[int]] = {}

    @property
    def workers(self) -> int:
        return len(self._load)

    def allowed(self, cpus: tuple[int, ...]) -> list[int]:
        """Workers a device pinned to cpus may use (all when cpus is empty)."""
        if not cpus:
            return list(range(self.workers))
        ok = [i for i, cpu in enumerate(self.home) if cpu is not None and cpu in cpus]
        if not ok:
            pinned = sorted({c for c in self.home if c is not None})
            raise SchedulerError(f"cpu_affinity {list(cpus)}: no worker runs there "
                                 f"(workers are pinned to {pinned or 'no CPU'}; see [daemon] cpu_affinity)")
        return ok

    def _pick(self, owner: str, cpus: tuple[int, ...]) -> int:
        mine = self._by_owner.get(owner, Counter())
        return min(self.allowed(cpus), key=lambda w: (mine[w], self._load[w], w))

    def attach(self, vring: NativeVring, *, owner: str, kind: int, dev: Any, kick_fd: int,
               backend_fd: int = -1, poll_us: int = 0, cpus: tuple[int, ...] = (),
               exclusive: bool = False) -> Placement:
        worker = EXCLUSIVE_WORKER if exclusive else self._pick(owner, cpus)
        task = self.native.attach(vring, worker, kind, dev, kick_fd, backend_fd, poll_us)
        if worker >= 0:
            self._load[worker] += 1
            self._by_owner.setdefault(owner, Counter())[worker] += 1
        return Placement(task, owner, worker)

    def release(self, p: Placement) -> None:
        """Accounts for a ring about to be detached (call on the event loop)."""
        if p.worker < 0:
            return
        self._load[p.worker] -= 1
        mine = self._by_owner[p.owner]
        mine[p.worker] -= 1
        if not +mine:
            del self._by_owner[p.owner]

    def status(self) -> list[dict[str, Any]]:
        out = []
        for i in range(self.workers):
            st = self.native.worker_stats(i)
            out.append({"worker": i, "cpu": self.home[i], "rings": self._load[i],
                        "wakeups": st.wakeups, "runs": st.runs, "polls": st.polls})
        return out

    def close(self) -> None:
        self.native.close()
