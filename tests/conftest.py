"""Shared fixtures for vhostd's unit, property and session tests."""

from __future__ import annotations

import faulthandler
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path


import pytest
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from netns import NetNs
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vhd_helpers import Daemon, LoopFactory, Rig  # noqa: E402
from unavailable import missing  # noqa: E402

# Property tests run native code and subprocess-free rigs: keep them bounded
# and free of timing flakiness.
settings.register_profile(
    "vhostd", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile("vhostd")


@pytest.fixture
def watchdog() -> Iterator[None]:
    """A hang in native code (a ring walk that never ends) must fail the run
    with tracebacks instead of blocking it forever.  Used by the unit test
    modules (``pytestmark``); not by the slow guest tests."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []
    n = 0

    def make(**kw: object) -> Rig:
        nonlocal n
        d = tmp_path / f"rig{n}"
        d.mkdir()
        n += 1
        rig = Rig(d, **kw)  # type: ignore[arg-type]
        rigs.append(rig)
        return rig

    yield make
    for r in rigs:
        r.close()


@pytest.fixture
def rig(rig_factory: Callable[..., Rig]) -> Rig:
    return rig_factory()


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    """Starts ``vhostd blk`` subprocesses.  At teardown every daemon must
    still be running (a front-end must never be able to kill it) and must
    exit 0 on SIGTERM."""
    daemons: list[Daemon] = []

    def make(**kw: object) -> Daemon:
        d = Daemon(**kw)  # type: ignore[arg-type]
        daemons.append(d)
        return d

    yield make
    problems = []
    for d in daemons:
        alive = d.alive
        rc = d.stop()
        if not alive:
            problems.append(f"vhostd died during the test (rc {rc}):\n{d.log()}")
        elif rc != 0:
            problems.append(f"vhostd exited {rc} on SIGTERM:\n{d.log()}")
        d.cleanup()
    assert not problems, "\n".join(problems)


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory()


@pytest.fixture
def ns() -> Iterator["NetNs"]:
    """A fresh network namespace (root and /dev/net/tun needed: skipped
    without them locally, a failure in CI)."""
    from netns import netns, netns_available
    reason = netns_available()
    if reason is not None:
        missing(f"network tests: {reason}")
    with netns("t") as n:
        yield n



@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[LoopFactory]:
    """loop_device(content) -> (/dev/loopN, its backing file); detached after
    the test.  Needs root and loop devices (a failure in CI without them)."""
    import subprocess
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        missing("loop devices need root and /dev/loop-control")
    made: list[str] = []

    def make(content: bytes) -> tuple[str, Path]:
        backing = tmp_path / f"loop{len(made)}.img"
        backing.write_bytes(content)
        dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True, capture_output=True,
                             text=True).stdout.strip()
        made.append(dev)
        return dev, backing

    yield make
    for dev in made:
        subprocess.run(["losetup", "-d", dev], check=False)
