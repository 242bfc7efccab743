"""The daemon's configuration: a TOML file validated into typed objects
before anything starts.  Every error names the file, the key and what is
allowed, e.g. ``vhostd.toml: devices.disk0.num_queues: 0 is not in 1..8``.

    [daemon]                        # optional
    control_socket = "/run/vhostd/control.sock"
    metrics_listen = "127.0.0.1:9464"
    workers = 2                     # ring worker threads [default: one per CPU]
    cpu_affinity = [0, 1]           # pin worker i to the i-th CPU of the list
    sandbox = true                  # ring workers under seccomp, capabilities dropped

    [devices.disk0]
    type = "blk"
    socket = "/run/vhostd/disk0.sock"
    file = "/var/lib/vhostd/disk0.img"
    num_queues = 2

    [devices.disk0.limits]          # optional: QoS, libvirt <iotune> names (vhostd/qos.py)
    total_iops_sec = 2000
    group = "tenant1"               # devices of one group share its limits

    [devices.net0]
    type = "net"
    socket = "/run/vhostd/net0.sock"
    tap = "vtap0"
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vhostd.devices.blk import MAX_QUEUES, SERIAL_BYTES, Discard, Engine
from vhostd.devices.net import MAX_MTU, MAX_QUEUE_PAIRS, MIN_MTU, parse_mac
from vhostd.native import MAX_WORKERS
from vhostd.qos import Limits, LimitError, parse_limits
from vhostd.scheduler import SchedulerConfig

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Endpoint:
    socket: Path | None
    client: bool = False
    socket_group: str | None = None
    fd: int | None = None        # an inherited listening socket (command line only)


@dataclass(frozen=True)
class Workers:
    poll_us: int = 0
    cpu_affinity: tuple[int, ...] = ()


@dataclass(frozen=True)
class BlkConfig:
    name: str
    endpoint: Endpoint
    workers: Workers
    file: Path
    read_only: bool = False
    num_queues: int = 1
    serial: str = ""
    aio: Engine = Engine.IO_URING
    direct: bool = False
    discard: Discard = Discard.UNMAP
    write_cache: bool = True
    limits: Limits = Limits("blk")


@dataclass(frozen=True)
class NetConfig:
    name: str
    endpoint: Endpoint
    workers: Workers
    tap: str | None
    backend: str = "tap"
    bridge: str | None = None
    mtu: int | None = None
    mac: bytes | None = None
    queue_pairs: int = 1
    limits: Limits = Limits("net")


DeviceConfig = BlkConfig | NetConfig


@dataclass(frozen=True)
class DaemonConfig:
    control_socket: Path | None = None
    metrics_listen: tuple[str, int] | None = None
    workers: int = 0                       # 0: one per CPU of cpu_affinity or of the affinity mask
    cpu_affinity: tuple[int, ...] = ()
    sandbox: bool = False                  # vhostd/sandbox.py

    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(workers=self.workers, cpus=self.cpu_affinity)


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    devices: tuple[DeviceConfig, ...] = ()
    source: str = "<built-in>"

    def device(self, name: str) -> DeviceConfig | None:
        return next((d for d in self.devices if d.name == name), None)


# --- validation ------------------------------------------------------------

class _Table:
    """Typed access to one TOML table; remembers which keys were used so
    unknown ones can be reported."""

    def __init__(self, where: str, data: Mapping[str, Any]) -> None:
        self.where = where
        self.data = data
        self.used: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}.{key}: {message}")

    def get(self, key: str, kind: type, default: Any = None, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise ConfigError(f"{self.where}: missing key {key!r}")
            return default
        value = self.data[key]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise self.error(key, f"{value!r} is not a {_KIND_NAMES.get(kind, kind.__name__)}")
        return value

    def int_in(self, key: str, lo: int, hi: int, default: int | None) -> int | None:
        value = self.get(key, int, default)
        if value is not None and not lo <= value <= hi:
            raise self.error(key, f"{value} is not in {lo}..{hi}")
        return value  # type: ignore[no-any-return]

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self.error(key, f"{value!r} is not one of {', '.join(choices)}")
        return value  # type: ignore[no-any-return]

    def check_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key {unknown[0]!r}"
                              f" (allowed: {', '.join(sorted(self.used))})")


_KIND_NAMES = {int: "whole number", str: "string", bool: "boolean (true/false)", dict: "table", list: "list"}


def _endpoint(t: _Table) -> Endpoint:
    return Endpoint(socket=Path(t.get("socket", str, required=True)),
                    client=t.get("client", bool, False),
                    socket_group=t.get("socket_group", str))


def _cpus(t: _Table) -> tuple[int, ...]:
    cpus = t.get("cpu_affinity", list, [])
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cpus):
        raise t.error("cpu_affinity", f"{cpus!r} is not a list of CPU numbers")
    return tuple(cpus)


def _workers(t: _Table) -> Workers:
    return Workers(poll_us=t.int_in("poll_us", 0, 1000, 0) or 0, cpu_affinity=_cpus(t))


def _limits(t: _Table, kind: str) -> Limits:
    table = t.get("limits", dict, {})
    try:
        return parse_limits(kind, table)
    except LimitError as e:
        raise t.error(f"limits.{e.key}", e.message) from None


def _blk(name: str, t: _Table) -> BlkConfig:
    serial = t.get("serial", str, "")
    if len(serial.encode()) > SERIAL_BYTES:
        raise t.error("serial", f"longer than {SERIAL_BYTES} bytes")
    return BlkConfig(
        name=name, endpoint=_endpoint(t), workers=_workers(t),
        file=Path(t.get("file", str, required=True)),
        read_only=t.get("read_only", bool, False),
        num_queues=t.int_in("num_queues", 1, MAX_QUEUES, 1) or 1,
        serial=serial,
        aio=Engine(t.choice("aio", tuple(e.value for e in Engine), Engine.IO_URING.value)),
        direct=t.get("direct", bool, False),
        discard=Discard(t.choice("discard", tuple(d.value for d in Discard), Discard.UNMAP.value)),
        write_cache=t.get("write_cache", bool, True),
        limits=_limits(t, "blk"),
    )


def _net(name: str, t: _Table) -> NetConfig:
    backend = t.choice("backend", ("tap", "null"), "tap")
    tap = t.get("tap", str)
    if (tap is None) == (backend == "tap"):
        raise ConfigError(f"{t.where}: 'tap' is required with backend \"tap\" (and only with it)")
    mac = t.get("mac", str)
    try:
        mac_bytes = parse_mac(mac) if mac else None
    except ValueError as e:
        raise t.error("mac", str(e).removeprefix("mac: ")) from None
    return NetConfig(
        name=name, endpoint=_endpoint(t), workers=_workers(t), tap=tap, backend=backend,
        bridge=t.get("bridge", str), mtu=t.int_in("mtu", MIN_MTU, MAX_MTU, None),
        mac=mac_bytes, queue_pairs=t.int_in("queue_pairs", 1, MAX_QUEUE_PAIRS, 1) or 1,
        limits=_limits(t, "net"),
    )


_DEVICE_TYPES: dict[str, Callable[[str, _Table], DeviceConfig]] = {"blk": _blk, "net": _net}


def _listen_addr(t: _Table) -> tuple[str, int] | None:
    value = t.get("metrics_listen", str)
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise t.error("metrics_listen", f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def parse(data: Mapping[str, Any], source: str) -> Config:
    top = _Table(source, data)
    daemon_t = _Table(f"{source}: daemon", top.get("daemon", dict, {}))
    control = daemon_t.get("control_socket", str)
    daemon = DaemonConfig(control_socket=Path(control) if control else None,
                          metrics_listen=_listen_addr(daemon_t),
                          workers=daemon_t.int_in("workers", 1, MAX_WORKERS, None) or 0,
                          cpu_affinity=_cpus(daemon_t),
                          sandbox=daemon_t.get("sandbox", bool, False))
    daemon_t.check_unknown()
    devices: list[DeviceConfig] = []
    for name, table in top.get("devices", dict, {}).items():
        where = f"{source}: devices.{name}"
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}: device names are letters, digits, '_', '.', '-' (up to 64)")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: is not a table")
        t = _Table(where, table)
        kind = t.choice("type", tuple(_DEVICE_TYPES), "blk") if "type" in table else None
        if kind is None:
            raise ConfigError(f"{where}: missing key 'type' (blk or net)")
        devices.append(_DEVICE_TYPES[kind](name, t))
        t.check_unknown()
    top.check_unknown()
    _check_unique(devices, source)
    _check_affinity(daemon, devices, source)
    _check_groups(devices, source)
    return Config(daemon=daemon, devices=tuple(devices), source=source)


def _check_unique(devices: list[DeviceConfig], source: str) -> None:
    seen: dict[Path, str] = {}
    for d in devices:
        if d.endpoint.socket is None:
            continue
        other = seen.setdefault(d.endpoint.socket, d.name)
        if other != d.name:
            raise ConfigError(f"{source}: devices.{d.name}.socket: {d.endpoint.socket} "
                              f"is also the socket of devices.{other}")


def _check_groups(devices: list[DeviceConfig], source: str) -> None:
    """Devices of one group share its buckets, so they must give the same limits."""
    first: dict[str, DeviceConfig] = {}
    for d in devices:
        g = d.limits.group
        if g is None:
            continue
        other = first.setdefault(g, d)
        if other.limits.values != d.limits.values:
            keys = sorted({k for k, _ in other.limits.values} ^ {k for k, _ in d.limits.values}
                          | {k for k, v in d.limits.values if other.limits.get(k) not in (0, v)})
            key = keys[0]
            raise ConfigError(f"{source}: devices.{d.name}.limits.{key}: {d.limits.get(key)} but "
                              f"devices.{other.name} of group {g!r} has {other.limits.get(key)}: "
                              f"devices of a group share its limits (give them all the same)")


def _check_affinity(daemon: DaemonConfig, devices: list[DeviceConfig], source: str) -> None:
    """A device's rings run on the daemon's shared workers: it can only ask
    for workers pinned to CPUs the daemon pins them to."""
    for d in devices:
        cpus = d.workers.cpu_affinity
        if not cpus:
            continue
        where = f"{source}: devices.{d.name}.cpu_affinity"
        if not daemon.cpu_affinity:
            raise ConfigError(f"{where}: needs [daemon] cpu_affinity (the CPUs the shared workers are pinned to)")
        outside = sorted(set(cpus) - set(daemon.cpu_affinity))
        if outside:
            raise ConfigError(f"{where}: CPU {outside[0]} is not in [daemon] cpu_affinity "
                              f"{list(daemon.cpu_affinity)}")


def load(path: Path) -> Config:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(data, str(path))


def changed_fields(a: DeviceConfig, b: DeviceConfig) -> list[str]:
    """Keys whose values differ (for reload reports)."""
    if type(a) is not type(b):
        return ["type"]
    return [f.name for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)]
