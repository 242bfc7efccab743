"""The in-process sandbox (``[daemon] sandbox = true``, ``--sandbox``), for
operators who do not run vhostd under the shipped systemd units.

* **Ring workers** (the native threads that handle what guests put in their
  rings) drop every capability and run under a seccomp allow-list from
  their first instruction (``native/sandbox.c``).  A syscall outside the
  list kills the process with SIGSYS.
* **The control plane** (this thread: vhost-user messages, reload, status)
  is not filtered, so a reload can still open images and sockets.  Once
  the devices, their sockets and taps are open (before the control socket
  and metrics endpoint, whose threads inherit the result) it keeps only the
  capabilities the configured devices need: CAP_NET_ADMIN for taps (to
  reconfigure them and add new ones on reload), CAP_CHOWN for a
  ``socket_group`` the process is not a member of.  A device added by
  reload that needs a capability dropped at start is refused with a
  message saying so.

Capabilities and seccomp filters belong to threads in Linux; both steps
are done on the threads they concern.
"""

from __future__ import annotations

import grp
import os
from dataclasses import dataclass

from vhostd._native import lib
from vhostd.config import BlkConfig, DeviceConfig, NetConfig

CAP_CHOWN = 0
CAP_NET_ADMIN = 12
CAP_NAMES = {CAP_CHOWN: "CAP_CHOWN", CAP_NET_ADMIN: "CAP_NET_ADMIN"}


class SandboxError(Exception):
    pass


def enable_workers() -> None:
    """Ring workers started from now on run sandboxed.  Raises SandboxError
    if this kernel or the process's own restrictions refuse the filter."""
    rc = lib.vhd_sandbox_enable()
    if rc < 0:
        raise SandboxError(f"sandbox: cannot install the ring workers' seccomp filter: "
                           f"{os.strerror(-rc)}")


def sandboxed_threads() -> int:
    return int(lib.vhd_sandbox_threads())


def _in_group(name: str) -> bool:
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        return False
    return gid == os.getegid() or gid in os.getgroups()


def device_caps(cfg: DeviceConfig) -> set[int]:
    """The capabilities the control plane needs to run (and set up) cfg."""
    caps: set[int] = set()
    if isinstance(cfg, NetConfig) and cfg.backend == "tap":
        caps.add(CAP_NET_ADMIN)
    if not isinstance(cfg, (BlkConfig, NetConfig)):   # pragma: no cover
        raise TypeError(cfg)
    group = cfg.endpoint.socket_group
    if group and not cfg.endpoint.client and cfg.endpoint.fd is None and not _in_group(group):
        caps.add(CAP_CHOWN)
    return caps


@dataclass
class Sandbox:
    kept: set[int]

    @classmethod
    def lock_down(cls, devices: list[DeviceConfig]) -> Sandbox:
        """Drops every capability the devices do not need (this thread, and
        threads it starts later)."""
        keep: set[int] = set()
        for d in devices:
            keep |= device_caps(d)
        mask = 0
        for cap in keep:
            mask |= 1 << cap
        rc = lib.vhd_sandbox_drop_caps(mask)
        if rc < 0:
            raise SandboxError(f"sandbox: cannot drop capabilities: {os.strerror(-rc)}")
        held = int(lib.vhd_sandbox_caps())
        return cls(kept={c for c in keep if held & (1 << c)})

    def refuses(self, cfg: DeviceConfig) -> str | None:
        """Why cfg cannot start under this sandbox, or None."""
        missing = sorted(device_caps(cfg) - self.kept)
        if not missing:
            return None
        names = ", ".join(CAP_NAMES.get(c, str(c)) for c in missing)
        return (f"needs {names}, which the sandbox dropped at start (no device needed it then): "
                f"restart vhostd to serve it")

    def status(self) -> dict[str, object]:
        return {"workers": f"seccomp allow-list ({lib.vhd_sandbox_syscall_count()} syscalls), "
                           f"no capabilities",
                "sandboxed_threads": sandboxed_threads(),
                "capabilities": sorted(CAP_NAMES.get(c, str(c)) for c in self.kept)}

    def describe(self) -> str:
        caps = ", ".join(sorted(CAP_NAMES.get(c, str(c)) for c in self.kept)) or "none"
        return (f"sandbox on: ring workers under a seccomp allow-list of "
                f"{lib.vhd_sandbox_syscall_count()} syscalls without capabilities; "
                f"capabilities kept: {caps}")
