"""Daemon lifecycle: listening sockets, one front-end per device at a time,
signals and clean shutdown.

Each device gets a listener task.  A connection starts a ``Session``; when
the front-end goes away the session releases everything it set up and the
next connection is accepted, without restarting the daemon.  A second
front-end while one is attached is refused with a log line.  SIGTERM and
SIGINT cancel everything; sessions finish closing (shielded) and socket
files vhostd created are removed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from vhostd.devices.base import Device
from vhostd.protocol.channel import Channel
from vhostd.protocol.session import Session

log = logging.getLogger("vhostd")

# --client: first retry after 50 ms, doubling up to 1 s between attempts.
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 1.0


@dataclass
class Listener:
    """Where a device meets its front-end: a path vhostd binds, an inherited
    listening fd, or (client) a path where the front-end listens."""

    socket_path: Path | None = None
    fd: int | None = None
    client: bool = False
    group: int | None = None     # --socket-group: mode 0660 with this group, else 0600
    sock: trio.socket.SocketType | None = field(default=None, repr=False)

    def open(self) -> None:
        if self.client:
            return   # nothing to bind: DeviceServer connects (and reconnects)
        if self.fd is not None:
            s = socket.socket(fileno=self.fd)
            if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM:
                s.detach()
                raise OSError(f"fd {self.fd} is not a Unix stream socket")
            self.sock = trio.socket.from_stdlib_socket(s)
            return
        assert self.socket_path is not None
        path = self.socket_path
        _remove_stale_socket(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(str(path))
            # Before listen(): nobody else can connect in between.
            if self.group is not None:
                os.chown(path, -1, self.group)
                os.chmod(path, 0o660)
            else:
                os.chmod(path, 0o600)
            s.listen(4)
        except OSError:
            s.close()
            raise
        self.sock = trio.socket.from_stdlib_socket(s)

    def close(self) -> None:
        if self.client:
            return
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if self.socket_path is not None:
                try:
                    self.socket_path.unlink()
                except FileNotFoundError:
                    pass

    def describe(self) -> str:
        if self.client:
            return f"{self.socket_path} (client)"
        return str(self.socket_path) if self.socket_path is not None else f"fd {self.fd}"


def _remove_stale_socket(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    path.unlink()


class DeviceServer:
    """Accepts front-ends for one device, one at a time."""

    def __init__(self, device: Device, listener: Listener) -> None:
        self.device = device
        self.listener = listener
        self.session: Session | None = None
        self._conn: trio.socket.SocketType | None = None
        self.connections = 0

    async def serve(self) -> None:
        if self.listener.client:
            await self._serve_as_client()
            return
        assert self.listener.sock is not None
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await self.listener.sock.accept()
                if self.session is not None and (self.session.closing or _hung_up(self._conn)):
                    # The previous front-end just left (QEMU reconnecting): let
                    # its session finish releasing the device first.
                    await self.session.closed.wait()
                if self.session is not None:
                    log.warning("%s: refusing a second front-end: one is already connected",
                                self.device.name)
                    conn.close()
                    continue
                self.connections += 1
                self._conn = conn
                self.session = Session(self.device, Channel(conn))
                log.info("%s: front-end connected on %s", self.device.name, self.listener.describe())
                nursery.start_soon(self._run_session, self.session, conn)

    async def _serve_as_client(self) -> None:
        """--client: connect to the front-end's socket; when it goes away
        (QEMU restarted, migration), keep retrying with back-off."""
        assert self.listener.socket_path is not None
        path = str(self.listener.socket_path)
        delay = RECONNECT_MIN_S
        waiting_logged = False
        while True:
            conn = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await conn.connect(path)
            except OSError as e:
                conn.close()
                if not waiting_logged:
                    log.info("%s: waiting for the front-end at %s (%s)", self.device.name, path, e.strerror)
                    waiting_logged = True
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            delay, waiting_logged = RECONNECT_MIN_S, False
            self.connections += 1
            self._conn = conn
            self.session = Session(self.device, Channel(conn))
            log.info("%s: connected to the front-end at %s", self.device.name, path)
            await self._run_session(self.session, conn)

    async def _run_session(self, session: Session, conn: trio.socket.SocketType) -> None:
        try:
            await session.run()
        finally:
            conn.close()
            self.session = None


def _hung_up(conn: trio.socket.SocketType | None) -> bool:
    """True if the peer closed conn (EOF is all that is left to read)."""
    if conn is None:
        return False
    try:
        with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as dup:
            return dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def run_daemon(servers: Sequence[DeviceServer],
                     on_ready: Callable[[], None] | None = None) -> None:
    """Serves all devices until SIGTERM/SIGINT.  Listeners must be open."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_wait_for_signal, nursery.cancel_scope)
            for server in servers:
                nursery.start_soon(server.serve)
            if on_ready is not None:
                on_ready()
    finally:
        for server in servers:
            server.listener.close()
            server.device.close()


async def _wait_for_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            scope.cancel()
            return
