"""Socket activation: which inherited listening socket belongs to which device.

systemd passes the sockets of every ``.socket`` unit that names the service,
each with the unit's ``FileDescriptorName=``.  A unit with several
``ListenStream=`` lines gives all of them the *same* name, so one device per
socket unit (``vhostd@NAME.socket``) is the only layout that can be matched.
Everything that cannot be matched unambiguously is an error that names the
fds and says what to do; nothing is ignored silently (an ignored socket
leaves a front-end that systemd already accepted waiting forever).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vhostd.config import DeviceConfig


@dataclass(frozen=True)
class InheritedFd:
    name: str            # FileDescriptorName= (or its position without one)
    fd: int
    path: Path | None    # the Unix path it listens on; None if unnamed or not AF_UNIX

    def describe(self) -> str:
        where = f", {self.path}" if self.path is not None else ""
        return f"fd {self.fd} ({self.name!r}{where})"


def inspect(fds: Sequence[tuple[str, int]]) -> list[InheritedFd]:
    """Adds the listening path of each inherited fd."""
    out = []
    for name, fd in fds:
        path: Path | None = None
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            pass
        else:
            with s:
                addr = s.getsockname() if s.family == socket.AF_UNIX else ""
                if isinstance(addr, str) and addr:
                    path = Path(addr)
        out.append(InheritedFd(name, fd, path))
    return out


@dataclass
class Activation:
    fds: dict[str, InheritedFd] = field(default_factory=dict)   # device name -> its socket
    errors: dict[str, str] = field(default_factory=dict)        # device name -> why it cannot start
    unused: list[str] = field(default_factory=list)             # fds no device takes, and why
    warnings: list[str] = field(default_factory=list)


def _unit_default_name(name: str) -> bool:
    return name.endswith(".socket") or name.isdigit()


def _unit_hint(name: str) -> str:
    return f"vhostd@{name}.socket"


def match(devices: Sequence[DeviceConfig], inherited: Sequence[InheritedFd]) -> Activation:
    a = Activation()
    by_name: dict[str, list[InheritedFd]] = {}
    for f in inherited:
        by_name.setdefault(f.name, []).append(f)
    names = {d.name for d in devices}
    # One device and one socket without a name of its own (systemd names it
    # after its unit, e.g. vhostd-blk@disk0.socket; systemd-socket-activate by
    # position): that device's socket.
    if len(devices) == 1 and len(inherited) == 1 and devices[0].endpoint.fd is None \
            and _unit_default_name(inherited[0].name):
        by_name = {devices[0].name: list(inherited)}
    taken: set[int] = set()
    for d in devices:
        mine = by_name.get(d.name, [])
        if d.endpoint.fd is not None:
            continue                  # --fd on the command line: that socket, nothing else
        if len(mine) > 1:
            a.errors[d.name] = (
                f"socket activation passed {len(mine)} sockets named {d.name!r}: "
                f"{', '.join(f.describe() for f in mine)}; systemd gives every socket of one "
                f".socket unit the same FileDescriptorName=: use one socket unit per device "
                f"({_unit_hint(d.name)})")
            taken.update(f.fd for f in mine)
            continue
        if mine and d.endpoint.client:
            a.errors[d.name] = (
                f"socket activation passed {mine[0].describe()}, but the device is a client "
                f"(client = true connects to {d.endpoint.socket}): remove its socket unit or "
                f"the client setting")
            taken.add(mine[0].fd)
            continue
        if mine:
            f = mine[0]
            a.fds[d.name] = f
            taken.add(f.fd)
            if f.path is not None and d.endpoint.socket is not None and f.path != d.endpoint.socket:
                a.warnings.append(f"{d.name}: socket activation {f.describe()} listens on {f.path}, "
                                  f"not on its configured socket {d.endpoint.socket}: front-ends "
                                  f"must connect to {f.path}")
            continue
        holder = next((f for f in inherited if f.path is not None and f.path == d.endpoint.socket), None)
        if holder is not None and not d.endpoint.client:
            a.errors[d.name] = (
                f"its socket {d.endpoint.socket} is where socket activation {holder.describe()} "
                f"listens; binding it would take the path from that socket: name that socket "
                f"{d.name!r} (FileDescriptorName={d.name}, as {_unit_hint(d.name)} does)")
            taken.add(holder.fd)
    for f in inherited:
        if f.fd in taken:
            continue
        if f.name in names:
            continue                  # a command-line --fd device of that name: not ours to judge
        dup = len(by_name.get(f.name, [])) > 1
        a.unused.append(
            f"socket activation {f.describe()} matches no device"
            + (" (and shares its name with another fd: one socket unit per device)" if dup else "")
            + f": add [devices.{f.name}] to the configuration and reload, or stop and disable "
              f"that socket unit")
    return a
