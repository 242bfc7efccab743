"""systemd integration without libsystemd: the sd_notify datagram protocol
(READY=1, STATUS=, WATCHDOG=1, STOPPING=1) and socket activation
(LISTEN_FDS / LISTEN_FDNAMES), as documented in sd_notify(3) and
sd_listen_fds(3).  Outside systemd every call is a no-op."""

from __future__ import annotations

import fcntl
import os
import socket

SD_LISTEN_FDS_START = 3


def notify(*assignments: str) -> bool:
    """Sends e.g. notify("READY=1", "STATUS=serving 2 devices"); False if not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]    # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto("\n".join(assignments).encode(), path)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


def listen_fds() -> list[tuple[str, int]]:
    """Sockets passed by socket activation, in order, as (FileDescriptorName=,
    fd); a socket without a name is named by its position, "0", "1", ...
    Names may repeat (every fd of one .socket unit has the unit's name).
    The variables are removed so child processes do not inherit them."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES", "")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if not count or not count.isdigit() or pid != str(os.getpid()):
        return []
    name_list = names.split(":") if names else []
    fds: list[tuple[str, int]] = []
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        name = name_list[i] if i < len(name_list) and name_list[i] not in ("", "unknown") else str(i)
        fds.append((name, fd))
    return fds
