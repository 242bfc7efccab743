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

import contextlib
import errno
import grp
import logging
import os
import resource
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio
from pyroute2 import NetlinkError

from vhostd import config as config_mod
from vhostd import activation, control, metrics, sandbox, systemd
from vhostd.backends.tap import TapError
from vhostd.config import BlkConfig, Config, DeviceConfig
from vhostd.devices.base import Device, DeviceError
from vhostd.devices.blk import BlkDevice, BlkOptions
from vhostd.devices.net import NetDevice, NetOptions
from vhostd.protocol.channel import Channel
from vhostd.protocol.session import Session
from vhostd.qos import Budget, LimitError, Limits
from vhostd.scheduler import Scheduler
from vhostd.vring import WorkerOptions

log = logging.getLogger("vhostd")

# --client: first retry after 50 ms, doubling up to 1 s between attempts.
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 1.0
RELOAD_REFUSED = "reload refused, configuration unchanged"


@dataclass
class Listener:
    """Where a device meets its front-end: a path vhostd binds, an inherited
    listening fd, or (client) a path where the front-end listens."""

    socket_path: Path | None = None
    fd: int | None = None        # inherited: kept open by the daemon, the listener uses a dup
    client: bool = False
    inherited_path: Path | None = None   # where an inherited fd listens (for logs and status)
    group: int | None = None     # --socket-group: mode 0660 with this group, else 0600
    sock: trio.socket.SocketType | None = field(default=None, repr=False)

    def open(self) -> None:
        if self.client:
            return   # nothing to bind: DeviceServer connects (and reconnects)
        if self.fd is not None:
            s = socket.socket(fileno=os.dup(self.fd))
            if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM:
                s.close()
                raise OSError(errno.EINVAL, f"fd {self.fd} is not a Unix stream socket")
            self.sock = trio.socket.from_stdlib_socket(s)
            return
        assert self.socket_path is not None
        path = self.socket_path
        _remove_stale_socket(path)
        # Bound and listening under a temporary name, then renamed: the path
        # appears only once a front-end can connect (QEMU tries as soon as it
        # sees it), with its mode set before anyone can (a path too long for
        # the temporary name is bound directly, mode still set before listen).
        tmp = path.with_name(f"{path.name}.{os.getpid()}~")
        where = tmp if len(os.fsencode(tmp)) < 108 else path
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(str(where))
            if self.group is not None:
                os.chown(where, -1, self.group)
                os.chmod(where, 0o660)
            else:
                os.chmod(where, 0o600)
            s.listen(4)
            if where != path:
                os.rename(where, path)
        except OSError:
            s.close()
            if where != path:
                with contextlib.suppress(OSError):
                    os.unlink(where)
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
        if self.socket_path is not None:
            return str(self.socket_path)
        return f"fd {self.fd}" + (f" ({self.inherited_path})" if self.inherited_path else "")


def _remove_stale_socket(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    path.unlink()


class DeviceServer:
    """Accepts front-ends for one device, one at a time."""

    def __init__(self, device: Device, listener: Listener, scheduler: Scheduler) -> None:
        self.device = device
        self.listener = listener
        self.scheduler = scheduler
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
                try:
                    conn, _ = await self.listener.sock.accept()
                except OSError as e:
                    if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        raise
                    # Out of fds or memory for now: the front-end waits in the
                    # backlog; the device must not die of it.
                    log.error("%s: cannot accept a front-end: %s (retrying in 1 s)", self.device.name,
                              e.strerror)
                    await trio.sleep(1)
                    continue
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
                self.session = Session(self.device, Channel(conn), self.scheduler)
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
            self.session = Session(self.device, Channel(conn), self.scheduler)
            log.info("%s: connected to the front-end at %s", self.device.name, path)
            await self._run_session(self.session, conn)

    def status(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.device.name,
            "type": self.device.device_type.value,
            "socket": self.listener.describe(),
            "connections": self.connections,
            "frontend": self.session is not None,
            "device": self.device.status(),
        }
        if self.session is not None:
            d |= self.session.status()
        return d

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


def build_device(cfg: DeviceConfig) -> Device:
    """A device from its validated configuration (may raise ValueError/OSError)."""
    workers = WorkerOptions(poll_us=cfg.workers.poll_us, cpus=cfg.workers.cpu_affinity)
    if isinstance(cfg, BlkConfig):
        return BlkDevice(cfg.name, BlkOptions(path=cfg.file, read_only=cfg.read_only,
                                              num_queues=cfg.num_queues, serial=cfg.serial,
                                              engine=cfg.aio, direct=cfg.direct, discard=cfg.discard,
                                              write_cache=cfg.write_cache), workers)
    return NetDevice(cfg.name, NetOptions(tap=cfg.tap, queue_pairs=cfg.queue_pairs, mtu=cfg.mtu,
                                          mac=cfg.mac, bridge=cfg.bridge), workers)


def _listener(cfg: DeviceConfig, inherited: activation.InheritedFd | None) -> Listener:
    ep = cfg.endpoint
    if ep.fd is not None:
        return Listener(fd=ep.fd)
    if inherited is not None:   # socket activation: matched by FileDescriptorName=
        return Listener(fd=inherited.fd, inherited_path=inherited.path)
    gid = None
    if ep.socket_group:
        try:
            gid = grp.getgrnam(ep.socket_group).gr_gid
        except KeyError:
            raise ValueError(f"socket_group {ep.socket_group!r}: no such group") from None
    return Listener(socket_path=ep.socket, client=ep.client, group=gid)


def raise_fd_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard one and returns it.  Every device holds
    fds (its socket, image, io_uring, an eventfd or three per ring, guest memory): a few
    hundred devices need more than the 1024 that systemd gives a service by default.
    Nothing here uses select() (trio waits in epoll), so a high limit is safe."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the open file limit from %d to %d: %s", soft, want, e)
        return soft
    return want


def os_reason(e: OSError) -> str:
    """An OSError as the operator should read it: no "[Errno N]"."""
    if isinstance(e, socket.gaierror):
        return str(e.strerror or e)
    if e.errno == errno.EAFNOSUPPORT:
        return ("address family not allowed (under systemd: RestrictAddressFamilies= must "
                "allow it, e.g. AF_INET AF_INET6 for a TCP endpoint)")
    hint = _systemd_hint(e, e.filename)
    if e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}{hint}"
    if e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    if e.strerror:
        return e.strerror
    return str(e.args[-1]) if e.args else type(e).__name__


def _systemd_hint(e: OSError, filename: object) -> str:
    """What to add to the unit, when systemd's hardening is why a path failed."""
    if not os.environ.get("INVOCATION_ID"):      # not a systemd service
        return ""
    if e.errno == errno.EROFS:
        return (" (under systemd's ProtectSystem=strict: allow its directory with "
                "ReadWritePaths= in a drop-in, see README)")
    if e.errno in (errno.EPERM, errno.EACCES) and str(filename or "").startswith("/dev/"):
        return " (under systemd's DevicePolicy=closed: allow it with DeviceAllow= in a drop-in, see README)"
    return ""


def _reason(e: Exception) -> str:
    """An operator error as one line (no traceback)."""
    if isinstance(e, OSError):
        return os_reason(e)
    if isinstance(e, ValueError) and isinstance(e.__cause__, OSError):
        return str(e) + _systemd_hint(e.__cause__, e.__cause__.filename)
    if isinstance(e, NetlinkError):
        why = os.strerror(e.code) if isinstance(e.code, int) else str(e)
        return f"netlink: {why}" + (" (CAP_NET_ADMIN needed)" if e.code == errno.EPERM else "")
    return str(e)


class Daemon:
    """Serves the devices of a configuration; each device is started,
    stopped and fails on its own, the others keep running."""

    def __init__(self, config: Config, config_path: Path | None = None,
                 on_ready: Callable[[Daemon], None] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.on_ready = on_ready
        self.servers: dict[str, DeviceServer] = {}
        self.configs: dict[str, DeviceConfig] = {}
        self.failed: dict[str, str] = {}
        self.scheduler: Scheduler | None = None
        self.inherited = activation.inspect(systemd.listen_fds())
        self.activation = activation.match(config.devices, self.inherited)
        # daemon endpoints (control socket, metrics): setting -> address, and
        # the reason for each that could not open (the devices run regardless)
        self.endpoints: dict[str, str] = {}
        self.endpoint_errors: dict[str, str] = {}
        self.sandbox: sandbox.Sandbox | None = None
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[str, trio.CancelScope] = {}
        self._gone: dict[str, trio.Event] = {}    # set once a device's task has finished
        self.groups: dict[str, Budget] = {}       # QoS groups: buckets shared by their devices
        self.rates: dict[str, dict[str, float]] = {}   # per device, over the last second

    # --- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Until SIGTERM/SIGINT; SIGHUP reloads the configuration file.
        Raises DaemonError, before READY=1, when devices are configured and
        none of them could start."""
        fatal: str | None = None
        raise_fd_limit()
        if self.config.daemon.sandbox:
            try:
                sandbox.enable_workers()     # before the workers start: each filters itself
            except sandbox.SandboxError as e:
                raise DaemonError(str(e)) from None
        try:
            self.scheduler = Scheduler(self.config.daemon.scheduler())
        except OSError as e:
            raise DaemonError(f"cannot start the ring workers: {e}") from None
        log.info("%d ring worker(s)%s", self.scheduler.workers,
                 f" pinned to CPUs {list(self.config.daemon.cpu_affinity)}" if self.config.daemon.cpu_affinity else "")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for line in self.activation.warnings:
                    log.warning("%s", line)
                for line in self.activation.unused:
                    log.error("%s", line)
                for cfg in self.config.devices:
                    await self._start_device(cfg)
                if self.config.devices and not self.servers:
                    fatal = "no device could be started: " + "; ".join(
                        f"{n}: {r}" for n, r in self.failed.items())
                    nursery.cancel_scope.cancel()
                else:
                    nursery.start_soon(self._signals, nursery.cancel_scope)
                    # Before the endpoints: the threads trio starts for them
                    # (getaddrinfo) inherit the reduced capabilities.
                    if self.config.daemon.sandbox:
                        fatal = self._lock_down()
                    if fatal is not None:
                        nursery.cancel_scope.cancel()
                    else:
                        await self._open_endpoints(nursery)
                        nursery.start_soon(self._sample_rates)
                        if (interval := systemd.watchdog_interval()) is not None:
                            nursery.start_soon(self._watchdog, interval)
                        systemd.notify("READY=1", f"STATUS={self._status_line()}")
                        if self.on_ready is not None:
                            self.on_ready(self)
        finally:
            systemd.notify("STOPPING=1")
            self.scheduler.close()   # every session closed (shielded): no ring is attached
        if fatal is not None:
            raise DaemonError(fatal)

    async def _open_endpoints(self, nursery: trio.Nursery) -> None:
        """The control socket and the metrics endpoint.  One that cannot open
        is one log line naming the setting and the reason, and shows in
        status (and systemd's STATUS=); the devices are served regardless."""
        d = self.config.daemon
        if d.control_socket is not None:
            where = str(d.control_socket)
            self.endpoints["control_socket"] = where
            try:
                sock = control.listen(d.control_socket)
            except OSError as e:
                self._endpoint_failed("control_socket", where, e)
            else:
                nursery.start_soon(control.serve, sock, d.control_socket, self._control)
        if d.metrics_listen is not None:
            host, port = d.metrics_listen
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            self.endpoints["metrics_listen"] = where
            try:
                listeners = await metrics.listen(host, port)
            except OSError as e:
                self._endpoint_failed("metrics_listen", where, e)
            else:
                nursery.start_soon(metrics.serve, listeners, self.status)
                log.info("metrics on http://%s/metrics", where)

    def _lock_down(self) -> str | None:
        """--sandbox: the devices' sockets, images and taps are open; keep
        only the capabilities the configured devices need.  The reason it failed
        (the daemon stops, before READY=1), or None."""
        try:
            self.sandbox = sandbox.Sandbox.lock_down(list(self.config.devices))
        except sandbox.SandboxError as e:
            return str(e)
        log.info("%s", self.sandbox.describe())
        return None

    def _endpoint_failed(self, setting: str, where: str, e: OSError) -> None:
        reason = os_reason(e)
        self.endpoint_errors[setting] = reason
        log.error("%s %s: cannot listen: %s; devices are served without it", setting, where, reason)

    async def _start_device(self, cfg: DeviceConfig) -> bool:
        assert self._nursery is not None
        if cfg.name in self.activation.errors:
            return self._fail(cfg, self.activation.errors[cfg.name])
        if self.sandbox is not None and (why := self.sandbox.refuses(cfg)) is not None:
            return self._fail(cfg, f"cannot start: {why}")
        try:
            listener = _listener(cfg, self.activation.fds.get(cfg.name))
            device = build_device(cfg)
        except (ValueError, OSError, TapError, NetlinkError) as e:
            return self._fail(cfg, f"cannot start: {_reason(e)}")
        try:
            listener.open()
        except OSError as e:
            device.close()
            return self._fail(cfg, f"cannot listen on {listener.describe()}: {os_reason(e)}")
        self._set_limits(device, cfg.limits)
        assert self.scheduler is not None
        server = DeviceServer(device, listener, self.scheduler)
        self.servers[cfg.name] = server
        self.configs[cfg.name] = cfg
        self.failed.pop(cfg.name, None)
        await self._nursery.start(self._run_device, server)
        log.info("%s: listening on %s", cfg.name, listener.describe())
        return True

    def _fail(self, cfg: DeviceConfig, reason: str) -> bool:
        log.error("%s: %s", cfg.name, reason)
        self.failed[cfg.name] = reason
        return False

    async def _run_device(self, server: DeviceServer,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        name = server.device.name
        with trio.CancelScope() as scope:
            self._scopes[name] = scope
            gone = self._gone[name] = trio.Event()
            task_status.started()
            try:
                await server.serve()
            except Exception as e:   # a bug in one device must not take the others down
                log.exception("%s: device failed", name)
                self.failed[name] = f"failed: {e}"
            finally:
                server.listener.close()
                self._leave_group(server.device)
                server.device.close()
                self.servers.pop(name, None)
                self._scopes.pop(name, None)
                if self._gone.get(name) is gone:
                    del self._gone[name]
                gone.set()

    async def stop_device(self, name: str) -> None:
        await self.stop_devices([name])

    async def stop_devices(self, names: list[str]) -> None:
        """Stops devices together: all are cancelled, then waited for (sessions
        close in parallel; no per-device delay)."""
        waits = []
        for name in names:
            scope = self._scopes.get(name)
            if scope is not None:
                scope.cancel()
            if (gone := self._gone.get(name)) is not None:
                waits.append(gone)
        for gone in waits:
            await gone.wait()
        for name in names:
            self.configs.pop(name, None)
            log.info("%s: stopped", name)

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                    continue
                log.info("received %s, shutting down", signal.Signals(signum).name)
                scope.cancel()
                return

    async def _watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await trio.sleep(interval)

    # --- reload -----------------------------------------------------------------

    async def reload(self, force: bool = False) -> list[str]:
        """Applies the configuration file again: added devices start, removed
        ones stop (only without a front-end unless force), changed ones are
        reported as needing a restart."""
        if self.config_path is None:
            return self._report(["no configuration file: nothing to reload"])
        try:
            new = config_mod.load(self.config_path)
        except config_mod.ConfigError as e:
            return self._report([f"{RELOAD_REFUSED}: {e}"])
        report: list[str] = []
        wanted = {d.name: d for d in new.devices}
        # Added devices may take sockets systemd passed (kept open for them).
        self.activation = activation.match(new.devices, self.inherited)
        stopping = []
        for name in list(self.configs):
            if name in wanted:
                continue
            server = self.servers.get(name)
            if server is not None and server.session is not None and not force:
                report.append(f"{name}: removed from the configuration but a front-end is attached: "
                              f"kept (reload with --force to stop it)")
                continue
            stopping.append(name)
        await self.stop_devices(stopping)
        report += [f"{name}: stopped" for name in stopping]
        for name, cfg in wanted.items():
            old = self.configs.get(name)
            if old is None:
                ok = await self._start_device(cfg)
                report.append(f"{name}: started" if ok else f"{name}: {self.failed[name]}")
            elif old != cfg:
                keys = [k for k in config_mod.changed_fields(old, cfg) if k != "limits"]
                if old.limits != cfg.limits and (server := self.servers.get(name)) is not None:
                    # in place, on the running rings: no restart, no reconnect
                    report += self._set_limits(server.device, cfg.limits)
                    self.configs[name] = replace(old, limits=cfg.limits)
                if keys:
                    report.append(f"{name}: changed ({', '.join(keys)}): restart this device to apply")
        self.config = new
        systemd.notify(f"STATUS={self._status_line()}")
        return self._report(report or ["no change"])

    @staticmethod
    def _report(lines: list[str]) -> list[str]:
        for line in lines:
            log.info("reload: %s", line)
        return lines

    # --- status -----------------------------------------------------------------

    def _status_line(self) -> str:
        attached = sum(1 for s in self.servers.values() if s.session is not None)
        line = f"serving {len(self.servers)} device(s), {attached} with a front-end"
        line += f", {len(self.failed)} failed" if self.failed else ""
        return line + "".join(f", {k} failed" for k in self.endpoint_errors)

    def status(self) -> dict[str, Any]:
        return {
            "devices": [server.status() | {"qos": self.qos_status(server)}
                        for _, server in sorted(self.servers.items())],
            "failed": dict(self.failed),
            "workers": self.scheduler.status() if self.scheduler else [],
            "endpoints": {k: {"address": v, "error": self.endpoint_errors.get(k)}
                          for k, v in self.endpoints.items()},
            "unused_sockets": list(self.activation.unused),
            "sandbox": self.sandbox.status() if self.sandbox is not None else None,
        }

    async def _control(self, req: dict[str, Any]) -> dict[str, Any]:
        match req["command"]:
            case "status":
                return {"ok": True, "status": self.status()}
            case "reload":
                return {"ok": True, "report": await self.reload(force=bool(req.get("force")))}
            case "resize":
                return await self.resize(req)
            case "limit":
                return self.limit(req)
            case other:
                return {"ok": False, "error": f"unknown command {other!r}"}


    async def resize(self, req: dict[str, Any]) -> dict[str, Any]:
        """`vhostd resize`: a disk's new size (or its file's or block
        device's current one), then a config change to the front-end."""
        name, size, shrink = req.get("device"), req.get("size"), bool(req.get("shrink"))
        server = self.servers.get(name) if isinstance(name, str) else None
        if server is None or not isinstance(server.device, BlkDevice):
            return {"ok": False, "error": f"{name!r} is not a disk of this daemon"}
        if size is not None and (not isinstance(size, int) or size <= 0):
            return {"ok": False, "error": f"size {size!r} is not a positive number of bytes"}
        try:
            old, new = server.device.resize(size, shrink)
        except DeviceError as e:
            return {"ok": False, "error": f"{name}: {e}"}
        if old == new:
            return {"ok": True, "report": [f"{name}: {new} bytes, unchanged"]}
        log.info("%s: resized from %d to %d bytes", name, old, new)
        told = await server.session.config_changed() if server.session is not None else \
            "no front-end attached: the next one sees the new size"
        return {"ok": True, "report": [f"{name}: {old} -> {new} bytes; {told}"]}


    # --- QoS ----------------------------------------------------------------------

    def limit(self, req: dict[str, Any]) -> dict[str, Any]:
        """`vhostd limit DEVICE key=value...`: changes a running device's
        limits (a grouped device's: its group's) on its running rings; a
        refused value changes nothing.  Without changes: shows them."""
        name, changes = req.get("device"), req.get("set") or {}
        server = self.servers.get(name) if isinstance(name, str) else None
        if server is None:
            return {"ok": False, "error": f"{name!r} is not a device of this daemon"}
        if not isinstance(changes, dict):
            return {"ok": False, "error": "set: expected {key: value}"}
        device = server.device
        if not changes:
            return {"ok": True, "report": [f"{name}: {device.qos.limits.describe()}"]}
        try:
            new = device.qos.limits.merged(changes)
        except LimitError as e:
            return {"ok": False, "error": f"{name}: {e}; limits unchanged ({device.qos.limits.describe()})"}
        report = self._set_limits(device, new)
        for member in self._members(device):
            if (cfg := self.configs.get(member)) is not None:
                self.configs[member] = replace(cfg, limits=replace(new, kind=cfg.limits.kind))
        return {"ok": True, "report": report}

    def _members(self, device: Device) -> set[str]:
        return set(device.qos.budget.members) | {device.name}

    def _set_limits(self, device: Device, limits: Limits) -> list[str]:
        """Applies limits to a device (and, in a group, to the group): new
        buckets, then every running ring moved to them between two turns of
        its worker (at once: a ring waiting on a timer looks again), then the
        old buckets freed."""
        qos = device.qos
        old_budget, old_limits = qos.budget, qos.limits
        to_free = []
        if limits.group is not None:
            budget = self.groups.get(limits.group)
            if budget is None:
                budget = self.groups[limits.group] = Budget(Limits(qos.kind, group=limits.group))
        else:
            budget = old_budget if old_budget.limits.group is None else Budget(Limits(qos.kind))
        if budget is not old_budget:
            old_budget.members.discard(device.name)
            if old_budget.limits.group is not None and not old_budget.members:
                self.groups.pop(old_budget.limits.group, None)
                to_free.append(old_budget.rebuild(Limits(qos.kind)))
        budget.members.add(device.name)
        qos.budget = budget
        if budget.limits != limits or budget.native is None and limits.limited:
            to_free.append(budget.rebuild(limits))
        for member in budget.members | {device.name}:
            server = self.servers.get(member)
            dev = server.device if server is not None else device if member == device.name else None
            if dev is None:
                continue
            dev.qos.budget = budget
            sess = server.session if server is not None else None
            if sess is not None:
                dev.qos.rebind((vr.index, vr.placement.task) for vr in sess.vrings if vr.placement is not None)
        for native in to_free:
            if native is not None:
                native.close()
        if old_limits == limits:
            return []
        scope = f" (group {limits.group}: {', '.join(sorted(budget.members))})" if limits.group else ""
        line = f"{device.name}: limits {old_limits.describe()} -> {limits.describe()}{scope}"
        log.info("%s", line)
        return [line]

    def _leave_group(self, device: Device) -> None:
        budget = device.qos.budget
        budget.members.discard(device.name)
        if budget.limits.group is None:
            native = budget.rebuild(Limits(device.qos.kind))
        elif not budget.members:
            self.groups.pop(budget.limits.group, None)
            native = budget.rebuild(Limits(device.qos.kind))
        else:
            return
        if native is not None:
            native.close()

    async def _sample_rates(self) -> None:
        """Each second, every device's current rates (status, top, metrics)."""
        prev: dict[str, tuple[float, dict[str, int]]] = {}
        while True:
            now = trio.current_time()
            for name, server in list(self.servers.items()):
                counts = _rate_counters(server)
                last = prev.get(name)
                if last is not None and now > last[0]:
                    dt = now - last[0]
                    # (a new front-end's rings count from 0 again)
                    self.rates[name] = {k: max(0, v - last[1].get(k, 0)) / dt for k, v in counts.items()}
                prev[name] = (now, counts)
            for name in set(self.rates) - set(self.servers):
                self.rates.pop(name, None)
                prev.pop(name, None)
            await trio.sleep(1)

    def qos_status(self, server: DeviceServer) -> dict[str, Any]:
        qos = server.device.qos
        st = qos.stats()
        return {
            "limits": qos.limits.as_dict(),
            "group": qos.limits.group,
            "group_members": sorted(qos.budget.members) if qos.limits.group else [],
            "throttled_seconds": st.throttled_ns / 1e9,
            "throttles": st.throttles,
            "rates": {k: round(v, 1) for k, v in self.rates.get(server.device.name, {}).items()},
        }


def _rate_counters(server: DeviceServer) -> dict[str, int]:
    """What the rates are computed from: blk requests and bytes each way,
    net frames and bytes each way (frame bytes, as the limits count them)."""
    if isinstance(server.device, NetDevice):
        out = {"tx_packets": 0, "tx_bytes": 0, "rx_packets": 0, "rx_bytes": 0}
        for p in server.device.pairs:
            s = p.stats()
            out["tx_packets"] += s.tx_frames
            out["tx_bytes"] += s.tx_bytes
            out["rx_packets"] += s.rx_frames
            out["rx_bytes"] += s.rx_bytes
        return out
    out = {"iops": 0, "read_bytes": 0, "write_bytes": 0}
    if server.session is not None:
        for vr in server.session.vrings:
            rs = vr.stats()
            out["iops"] += rs.requests
            out["read_bytes"] += rs.bytes_written    # from the disk into guest memory
            out["write_bytes"] += rs.bytes_read
    return out


class DaemonError(Exception):
    pass
