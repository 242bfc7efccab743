"""Command line (QEMU's vhost-user back-end program conventions:
--socket-path / --fd, --print-capabilities, never daemonize).

`blk` and `net` serve one device from options; `serve` serves a
configuration file (or the built-in default); both run the same Daemon."""

from __future__ import annotations

import grp
import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import click
import trio

from vhostd import __version__
from vhostd import config as config_mod
from vhostd import control
from vhostd.config import BlkConfig, Config, DaemonConfig, DeviceConfig, Endpoint, NetConfig, Workers
from vhostd.daemon import RELOAD_REFUSED, Daemon, DaemonError
from vhostd.devices.blk import MAX_QUEUES, Discard, Engine
from vhostd.devices.net import MAX_QUEUE_PAIRS, parse_mac
from vhostd.native import MAX_WORKERS
from vhostd.qos import LimitError, Limits, parse_limits

DEFAULT_IMAGE_SIZE = 1 << 30
log = logging.getLogger("vhostd")


def _setup_logging(level: str) -> None:
    # journald adds its own timestamps; a terminal gets them from us.
    fmt = "%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s vhostd %(levelname)s %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="vhostd", message="%(prog)s %(version)s")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True, help="Least severe messages to log.")
def main(log_level: str) -> None:
    """vhostd: a vhost-user back-end for virtio-blk and virtio-net devices.

    QEMU connects to vhostd's Unix socket and shares guest memory; vhostd
    moves the data in native threads.  `vhostd serve` starts the devices of
    a configuration file (or a default disk), `vhostd blk` serves one disk
    image or block device, `vhostd net` one NIC on a tap device.
    """
    _setup_logging(log_level)


F = TypeVar("F", bound=Callable[..., Any])


def endpoint_options(f: F) -> F:
    """--socket-path / --fd / --client / --socket-group, shared by every device command."""
    f = click.option("--client", is_flag=True,
                     help="Connect to --socket-path, where the front-end listens "
                          "(QEMU: -chardev socket,server=on,wait=off), and reconnect "
                          "whenever it goes away.")(f)
    f = click.option("--fd", type=int, help="Inherited listening Unix socket fd (instead of --socket-path).")(f)
    f = click.option("--socket-group",
                     help="Group allowed to connect: the socket gets mode 0660 and this "
                          "group [default: 0600, owner only].")(f)
    f = click.option("--socket-path", type=click.Path(path_type=Path),
                     help="Unix socket to listen on (or, with --client, to connect to).")(f)
    return f


def worker_options(f: F) -> F:
    """--poll-us, --cpu-affinity and --workers, shared by every device command."""
    f = click.option("--poll-us", type=click.IntRange(0, 1000), default=0, show_default=True,
                     help="After a burst, busy-poll the rings this long before sleeping "
                          "(lower latency, more CPU; an idle device never polls).")(f)
    f = click.option("--cpu-affinity", "cpus", default="",
                     help="Comma-separated CPUs to pin the ring workers to (worker i gets the "
                          "i-th, cycling) [default: no pinning].")(f)
    f = click.option("--workers", type=click.IntRange(1, MAX_WORKERS), default=None,
                     help="Ring worker threads [default: one per CPU of --cpu-affinity, or of "
                          "the CPUs vhostd may run on].")(f)
    return f


def daemon_options(f: F) -> F:
    """--control-socket, --metrics-listen and --sandbox, shared by the serving commands."""
    f = click.option("--sandbox", is_flag=True, default=None,
                     help="Run the ring workers under a seccomp allow-list without capabilities, "
                          "and keep only the capabilities the devices need once they are open "
                          "([daemon] sandbox; see README).")(f)
    f = click.option("--metrics-listen", metavar="HOST:PORT",
                     help="Serve Prometheus metrics on http://HOST:PORT/metrics.")(f)
    f = click.option("--control-socket", type=click.Path(path_type=Path),
                     help="Control socket for `vhostd status/top/reload` (mode 0600).")(f)
    return f


def _daemon_config(base: DaemonConfig, control_socket: Path | None, metrics_listen: str | None,
                   sandbox: bool | None = None) -> DaemonConfig:
    listen = base.metrics_listen
    if metrics_listen is not None:
        host, _, port = metrics_listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise click.BadParameter(f"{metrics_listen!r} is not HOST:PORT", param_hint="--metrics-listen")
        listen = (host.strip("[]"), int(port))
    return replace(base, control_socket=control_socket or base.control_socket, metrics_listen=listen,
                   sandbox=base.sandbox if sandbox is None else sandbox)


def _cpu_list(cpus: str) -> tuple[int, ...]:
    try:
        cpu_list = tuple(int(c) for c in cpus.split(",") if c.strip())
    except ValueError:
        raise click.BadParameter(f"{cpus!r} is not a comma-separated list of CPU numbers",
                                 param_hint="--cpu-affinity") from None
    bad = [c for c in cpu_list if not 0 <= c < (os.cpu_count() or 1)]
    if bad:
        raise click.BadParameter(f"CPU {bad[0]} does not exist here", param_hint="--cpu-affinity")
    return cpu_list


def _single_device(cfg: DeviceConfig, workers: int | None, cpus: str, control_socket: Path | None,
                   metrics_listen: str | None, sandbox: bool | None) -> Config:
    """One device: --workers and --cpu-affinity are the daemon's worker settings."""
    daemon = replace(_daemon_config(DaemonConfig(), control_socket, metrics_listen, sandbox),
                     workers=workers or 0, cpu_affinity=_cpu_list(cpus))
    return Config(daemon=daemon, devices=(cfg,), source="command line")


def _endpoint(socket_path: Path | None, fd: int | None, client: bool, socket_group: str | None) -> Endpoint:
    if (socket_path is None) == (fd is None):
        raise click.UsageError("give exactly one of --socket-path and --fd")
    if client and fd is not None:
        raise click.UsageError("--client connects to --socket-path; it cannot use --fd")
    if socket_group is not None:
        try:
            grp.getgrnam(socket_group)
        except KeyError:
            raise click.BadParameter(f"no group {socket_group!r}", param_hint="--socket-group") from None
    return Endpoint(socket=socket_path, client=client, socket_group=socket_group, fd=fd)


def _serve(config: Config, config_path: Path | None = None, banner: str | None = None) -> None:
    def ready(daemon: Daemon) -> None:
        if banner:
            click.echo(banner)

    try:
        trio.run(Daemon(config, config_path, ready).run)
    except DaemonError as e:
        raise click.ClickException(str(e)) from None


def _limits_option(f: Callable[..., None]) -> Callable[..., None]:
    return click.option("--limit", "limits", multiple=True, metavar="KEY=VALUE",
                         help="A QoS limit, as in [devices.X.limits] (repeat it; README \"QoS\"), "
                              "e.g. --limit total_iops_sec=2000.")(f)


def _parse_limits(kind: str, settings: tuple[str, ...]) -> Limits:
    items: dict[str, Any] = {}
    for s in settings:
        key, sep, value = s.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{s!r} is not KEY=VALUE", param_hint="--limit")
        if key == "group":
            items[key] = value or None
            continue
        try:
            items[key] = int(value)
        except ValueError:
            raise click.BadParameter(f"{key}: {value!r} is not a whole number", param_hint="--limit") from None
    try:
        return parse_limits(kind, items)
    except LimitError as e:
        raise click.BadParameter(str(e), param_hint="--limit") from None


@main.command()
@endpoint_options
@click.option("--file", "--blk-file", "file", type=click.Path(path_type=Path, dir_okay=False),
              help="Disk image (regular file) or block device to serve.")
@click.option("--read-only", is_flag=True, help="Offer VIRTIO_BLK_F_RO and refuse writes.")
@click.option("--num-queues", type=click.IntRange(1, MAX_QUEUES), default=1, show_default=True,
              help="Request queues (multi-queue).")
@click.option("--serial", default="", help="Serial number the guest sees (GET_ID, up to 20 bytes).")
@click.option("--aio", "engine", type=click.Choice([e.value for e in Engine]), default=Engine.IO_URING.value,
              show_default=True, help="I/O engine: io_uring keeps many requests in flight per queue; "
                                      "sync does one at a time.")
@click.option("--direct", is_flag=True, help="Open the file with O_DIRECT (bypass the host page cache).")
@click.option("--discard", type=click.Choice([d.value for d in Discard]), default=Discard.UNMAP.value,
              show_default=True, help="A guest's DISCARD: unmap punches a hole in the file (thin images "
                                      "shrink), ignore acknowledges it and does nothing.")
@click.option("--write-cache/--no-write-cache", default=True, show_default=True,
              help="Write-back (the guest flushes) or write-through (a write completes once durable); "
                   "the guest can switch it (CONFIG_WCE).")
@click.option("--name", default="blk0", show_default=True, help="Device name used in logs.")
@click.option("--print-capabilities", is_flag=True,
              help="Print the back-end's capabilities as JSON (vhost-user.rst) and exit.")
@_limits_option
@worker_options
@daemon_options
def blk(socket_path: Path | None, socket_group: str | None, fd: int | None, client: bool,
        file: Path | None, read_only: bool, num_queues: int, serial: str, engine: str, direct: bool,
        discard: str, write_cache: bool, name: str, print_capabilities: bool, limits: tuple[str, ...],
        poll_us: int, cpus: str, workers: int | None,
        control_socket: Path | None, metrics_listen: str | None, sandbox: bool | None) -> None:
    """Serve a virtio-blk device backed by FILE.

    \b
    QEMU side:
      -chardev socket,id=blk0,path=SOCKET
      -device vhost-user-blk-pci,chardev=blk0,num-queues=N
    with guest RAM shared, e.g.
      -object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem
    """
    if print_capabilities:
        click.echo(json.dumps({"type": "block", "features": ["read-only", "blk-file"]}, indent=2))
        return
    if file is None:
        raise click.UsageError("--file is required")
    if len(serial.encode()) > 20:
        raise click.BadParameter("longer than 20 bytes", param_hint="--serial")
    cfg = BlkConfig(name=name, endpoint=_endpoint(socket_path, fd, client, socket_group),
                    workers=Workers(poll_us=poll_us), file=file, read_only=read_only,
                    num_queues=num_queues, serial=serial, aio=Engine(engine), direct=direct,
                    discard=Discard(discard), write_cache=write_cache, limits=_parse_limits("blk", limits))
    _serve(_single_device(cfg, workers, cpus, control_socket, metrics_listen, sandbox))


@main.command()
@endpoint_options
@click.option("--tap", help="Tap device: attached to if it exists, else created (and removed on exit).")
@click.option("--backend", type=click.Choice(["tap", "null"]), default="tap", show_default=True,
              help="null: discard guest TX and fill guest RX buffers with a generated 60-byte "
                   "frame, for benchmarks and tests (no tap).")
@click.option("--bridge", help="Bridge to enslave the tap to.")
@click.option("--mtu", type=click.IntRange(68, 65535),
              help="MTU to set on the tap (the guest learns it via NET_SET_MTU / config).")
@click.option("--mac", help="Guest MAC in config space [default: stable, derived from the tap name].")
@click.option("--queue-pairs", type=click.IntRange(1, MAX_QUEUE_PAIRS), default=1, show_default=True,
              help="RX/TX queue pairs (multi-queue tap).")
@click.option("--name", default="net0", show_default=True, help="Device name used in logs.")
@click.option("--print-capabilities", is_flag=True,
              help="Print the back-end's capabilities as JSON (vhost-user.rst) and exit.")
@_limits_option
@worker_options
@daemon_options
def net(socket_path: Path | None, socket_group: str | None, fd: int | None, client: bool,
        tap: str | None, backend: str, bridge: str | None, mtu: int | None, mac: str | None,
        queue_pairs: int, name: str, print_capabilities: bool, limits: tuple[str, ...], poll_us: int, cpus: str,
        workers: int | None, control_socket: Path | None, metrics_listen: str | None,
        sandbox: bool | None) -> None:
    """Serve a virtio-net device whose frames go to and from a tap device.

    \b
    QEMU side (QEMU 7.2 under TCG needs vectors=0, see README):
      -chardev socket,id=net0,path=SOCKET
      -netdev vhost-user,id=net0,chardev=net0,queues=N
      -device virtio-net-pci,netdev=net0,mq=on,vectors=0
    with guest RAM shared (memory-backend-memfd,share=on).
    """
    if print_capabilities:
        click.echo(json.dumps({"type": "net", "features": []}, indent=2))
        return
    if (tap is None) == (backend == "tap"):
        raise click.UsageError("--tap is required with the tap back-end (and only with it)")
    try:
        mac_bytes = parse_mac(mac) if mac else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--mac") from None
    cfg = NetConfig(name=name, endpoint=_endpoint(socket_path, fd, client, socket_group),
                    workers=Workers(poll_us=poll_us), tap=tap, backend=backend, bridge=bridge,
                    mtu=mtu, mac=mac_bytes, queue_pairs=queue_pairs, limits=_parse_limits("net", limits))
    _serve(_single_device(cfg, workers, cpus, control_socket, metrics_listen, sandbox))


# --- serve: many devices from a configuration file --------------------------------

def _default_dirs() -> tuple[Path, Path]:
    """(state dir for images, runtime dir for sockets): systemd's, else per user."""
    if os.geteuid() == 0:
        state, run = Path("/var/lib/vhostd"), Path("/run/vhostd")
    else:
        state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "vhostd"
        run = Path(os.environ.get("XDG_RUNTIME_DIR", str(state))) / "vhostd"
    state = Path(os.environ.get("STATE_DIRECTORY", state))
    run = Path(os.environ.get("RUNTIME_DIRECTORY", run))
    return state, run


def qemu_blk_options(socket_path: Path, num_queues: int) -> str:
    return (
        "-object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem -m 1G \\\n"
        f"  -chardev socket,id=vhostd-disk0,path={socket_path} \\\n"
        f"  -device vhost-user-blk-pci,chardev=vhostd-disk0,num-queues={num_queues}"
    )


def default_config(state_dir: Path, socket_dir: Path) -> Config:
    """The built-in default: disk0 on a sparse 1 GiB image, and a control socket."""
    for d in (state_dir, socket_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    image = state_dir / "disk0.img"
    if not image.exists():
        with open(image, "wb") as f:
            f.truncate(DEFAULT_IMAGE_SIZE)
        log.info("created sparse %d MiB image %s", DEFAULT_IMAGE_SIZE >> 20, image)
    disk = BlkConfig(name="disk0", endpoint=Endpoint(socket=socket_dir / "disk0.sock"), workers=Workers(),
                     file=image, num_queues=min(2, os.cpu_count() or 1), serial="vhostd-disk0")
    return Config(daemon=DaemonConfig(control_socket=socket_dir / "control.sock"), devices=(disk,))


def _default_control() -> Path:
    return _default_dirs()[1] / "control.sock"


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="TOML file declaring the devices (see systemd/vhostd.toml) [default: built-in "
                   "single disk].")
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Without --config: where the default disk image lives [default: $STATE_DIRECTORY, "
                   "/var/lib/vhostd as root, ~/.local/state/vhostd otherwise].")
@click.option("--socket-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Without --config: where the sockets are created [default: $RUNTIME_DIRECTORY, "
                   "/run/vhostd as root, $XDG_RUNTIME_DIR/vhostd otherwise].")
@daemon_options
def serve(config_path: Path | None, state_dir: Path | None, socket_dir: Path | None,
          control_socket: Path | None, metrics_listen: str | None, sandbox: bool | None) -> None:
    """Serve every device of a configuration file, or the built-in default:
    one disk (disk0) on a sparse 1 GiB image created in the state directory
    and kept across restarts (the QEMU options that attach a guest are printed).

    SIGHUP (or `vhostd reload`) applies a changed configuration file: added
    devices start, removed ones stop, changed ones are reported.  Under
    systemd: Type=notify readiness, watchdog, and sockets passed by socket
    activation are matched to devices by FileDescriptorName=.
    """
    if config_path is not None:
        try:
            config = config_mod.load(config_path)
        except config_mod.ConfigError as e:
            raise click.ClickException(str(e)) from None
        config = replace(config, daemon=_daemon_config(config.daemon, control_socket, metrics_listen, sandbox))
        _serve(config, config_path)
        return
    default_state, default_run = _default_dirs()
    try:
        config = default_config(state_dir or default_state, socket_dir or default_run)
    except OSError as e:
        raise click.ClickException(f"cannot set up the default disk: {e.filename}: {e.strerror}") from None
    config = replace(config, daemon=_daemon_config(config.daemon, control_socket, metrics_listen, sandbox))
    disk = config.devices[0]
    assert isinstance(disk, BlkConfig) and disk.endpoint.socket is not None
    banner = (f"vhostd: serving disk0 ({disk.file}, {DEFAULT_IMAGE_SIZE >> 30} GiB) on {disk.endpoint.socket}\n"
              f"Attach a QEMU guest with:\n"
              f"  qemu-system-x86_64 ... {qemu_blk_options(disk.endpoint.socket, disk.num_queues)}\n"
              "Stop with Ctrl-C or SIGTERM.")
    _serve(config, banner=banner)


@main.command("check-config")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
def check_config(path: Path) -> None:
    """Validate a configuration file without starting anything."""
    try:
        config = config_mod.load(path)
    except config_mod.ConfigError as e:
        raise click.ClickException(str(e)) from None
    names = ", ".join(f"{d.name} ({'blk' if isinstance(d, BlkConfig) else 'net'})" for d in config.devices)
    click.echo(f"{path}: OK, {len(config.devices)} device(s){': ' + names if names else ''}")


# --- talking to a running daemon --------------------------------------------------

control_option = click.option(
    "--control", "control_path", type=click.Path(path_type=Path), default=None,
    help="The daemon's control socket [default: control.sock in the runtime directory].")


def _request(path: Path | None, command: str, **args: Any) -> dict[str, Any]:
    try:
        return control.request(path or _default_control(), command, **args)
    except control.ControlError as e:
        raise click.ClickException(str(e)) from None


@main.command()
@control_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(control_path: Path | None, as_json: bool) -> None:
    """Devices, front-ends, negotiated features and per-ring counters."""
    st = _request(control_path, "status")["status"]
    click.echo(json.dumps(st, indent=2) if as_json else format_status(st))


@main.command()
@control_option
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes.")
@click.option("--count", type=int, default=0, help="Stop after this many refreshes [default: forever].")
def top(control_path: Path | None, interval: float, count: int) -> None:
    """Per-ring request and byte rates, refreshed live."""
    prev: dict[tuple[str, int], dict[str, Any]] = {}
    prev_throttled: dict[str, float] = {}
    n = 0
    while count == 0 or n < count:
        st = _request(control_path, "status")["status"]
        rows, qos_rows = [], []
        for dev in st["devices"]:
            q = dev.get("qos")
            if q is None or not q["limits"]:
                continue
            was = prev_throttled.get(dev["name"])
            share = (q["throttled_seconds"] - was) / interval if was is not None else 0.0
            prev_throttled[dev["name"]] = q["throttled_seconds"]
            limits = " ".join(f"{k}={v}" for k, v in q["limits"].items())
            qos_rows.append(f"{dev['name']:<12} {100 * share:>10.0f}% {limits}")
        for dev in st["devices"]:
            for ring in dev.get("rings", []):
                key = (dev["name"], ring["index"])
                last = prev.get(key)
                rate = {k: (ring[k] - last[k]) / interval if last else 0.0
                        for k in ("requests", "bytes_read", "bytes_written", "kicks", "calls")}
                prev[key] = ring
                rows.append(f"{dev['name']:<12} {ring['index']:>4} {rate['requests']:>12.0f} "
                            f"{rate['bytes_read'] / 2**20:>10.1f} {rate['bytes_written'] / 2**20:>10.1f} "
                            f"{rate['kicks']:>9.0f} {rate['calls']:>9.0f} {ring['errors']:>7}")
        if sys.stdout.isatty():
            click.clear()
        click.echo(f"{'device':<12} {'ring':>4} {'req/s':>12} {'rd MiB/s':>10} {'wr MiB/s':>10} "
                   f"{'kicks/s':>9} {'calls/s':>9} {'errors':>7}")
        click.echo("\n".join(rows) if rows else "(no front-end attached)")
        if qos_rows:
            # throttled: ring-seconds held by a limit per second (rings of a device add up)
            click.echo(f"\n{'device':<12} {'throttled':>11} limits")
            click.echo("\n".join(qos_rows))
        n += 1
        if count == 0 or n < count:
            time.sleep(interval)


def _control_named_in(path: Path) -> Path:
    """[daemon] control_socket of a configuration file, read without
    validating the devices (reload is where the daemon validates them)."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise click.ClickException(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise click.ClickException(f"{path}: not valid TOML: {e}; the daemon keeps its "
                                   f"configuration") from None
    daemon = data.get("daemon")
    control_socket = daemon.get("control_socket") if isinstance(daemon, dict) else None
    if not isinstance(control_socket, str):
        raise click.ClickException(f"{path}: no [daemon] control_socket: vhostd reload needs one "
                                   f"(or send the daemon SIGHUP)")
    return Path(control_socket)


@main.command()
@control_option
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Use the control socket this configuration file names (what the unit's "
                   "ExecReload does).")
@click.option("--force", is_flag=True, help="Also stop removed devices that have a front-end attached.")
def reload(control_path: Path | None, config_path: Path | None, force: bool) -> None:
    """Apply the daemon's configuration file again (like SIGHUP), print what
    changed, and exit non-zero if the daemon refused the file."""
    if control_path is None and config_path is not None:
        control_path = _control_named_in(config_path)
    report = _request(control_path, "reload", force=force)["report"]
    for line in report:
        click.echo(line)
    if any(line.startswith(RELOAD_REFUSED) for line in report):
        sys.exit(1)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes, with an optional K/M/G/T suffix (powers of 1024)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
    try:
        n = int(t[: len(t) - len(unit)]) * _SIZE_UNITS[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 10G, 512M, 1073741824)") from None
    if n <= 0 or n % 512:
        raise click.BadParameter(f"{text!r}: a disk size is a positive multiple of 512 bytes")
    return n


@main.command()
@control_option
@click.argument("device")
@click.argument("size", required=False)
@click.option("--shrink", is_flag=True, help="Allow a size below the current one (data past it is lost).")
def resize(control_path: Path | None, device: str, size: str | None, shrink: bool) -> None:
    """Resize a running disk: extend its file to SIZE (e.g. 20G), or without
    SIZE take the size its file or block device has now; the guest sees the
    new capacity at once (a config change through the back-end channel)."""
    nbytes = parse_size(size) if size is not None else None
    for line in _request(control_path, "resize", device=device, size=nbytes, shrink=shrink)["report"]:
        click.echo(line)


@main.command()
@control_option
@click.argument("device")
@click.argument("settings", nargs=-1, metavar="[KEY=VALUE]...")
def limit(control_path: Path | None, device: str, settings: tuple[str, ...]) -> None:
    """Show or change a running device's QoS limits, e.g.
    `vhostd limit disk0 total_iops_sec=2000 total_iops_sec_max=5000`
    (0: unlimited; a grouped disk's limits are its group's).  They apply to
    the running rings at once, without a reconnect; a refused value changes
    nothing.  Keys: see README "QoS"."""
    changes: dict[str, Any] = {}
    for s in settings:
        key, sep, value = s.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{s!r} is not KEY=VALUE", param_hint="SETTINGS")
        try:
            changes[key] = value or None if key == "group" else int(value)
        except ValueError:
            # the daemon names the key: `ten` reaches it as a string
            changes[key] = value
    for line in _request(control_path, "limit", device=device, set=changes)["report"] or ["no change"]:
        click.echo(line)


def format_qos(q: dict[str, Any]) -> str:
    limits = " ".join(f"{k}={v}" for k, v in q["limits"].items() if k != "group") or "unlimited"
    rates = " ".join(f"{k}={v:g}/s" for k, v in q.get("rates", {}).items())
    group = f" (group {q['group']}: {', '.join(q['group_members'])})" if q.get("group") else ""
    return (f"  qos: {limits}{group}; throttled {q['throttled_seconds']:.3f} s "
            f"({q['throttles']} times)" + (f"; now {rates}" if rates else ""))


def format_status(st: dict[str, Any]) -> str:
    out = []
    for dev in st["devices"]:
        out.append(f"{dev['name']} ({dev['type']}) on {dev['socket']}: "
                   f"{'front-end connected' if dev['frontend'] else 'waiting for a front-end'}"
                   f", {dev['connections']} connection(s) so far")
        if dev["frontend"]:
            out.append(f"  features: {' '.join(dev['features'])}")
            out.append(f"  protocol features: {' '.join(dev['protocol_features'])}")
            out.append(f"  memory: {dev.get('memory_mib', 0)} MiB in {dev.get('memory_regions', 0)} region(s)")
            if (log := dev.get("dirty_log")) and (log["enabled"] or log["pages"]):
                out.append(f"  dirty log: {'on' if log['enabled'] else 'off'}, {log['pages']} pages logged"
                           + (f", {log['refused']} refused (the front-end's log is too small)"
                              if log["refused"] else ""))
            out.append(f"  {'ring':>4} {'layout':>6} {'size':>6} {'state':>8} {'requests':>12} {'read':>12} "
                       f"{'written':>12} {'errors':>7} {'kicks':>9} {'calls':>9}")
            for r in dev["rings"]:
                state = "broken" if r["broken"] else "running" if r["running"] else \
                    "enabled" if r["enabled"] else "off"
                out.append(f"  {r['index']:>4} {r['layout']:>6} {r['size']:>6} {state:>8} {r['requests']:>12} "
                           f"{r['bytes_read']:>12} {r['bytes_written']:>12} {r['errors']:>7} "
                           f"{r['kicks']:>9} {r['calls']:>9}" + (f"  ({r['broken']})" if r["broken"] else ""))
        if (q := dev.get("qos")) is not None:
            out.append(format_qos(q))
        for k, v in dev.get("device", {}).items():
            if k != "queue_pairs":
                out.append(f"  {k}: {v}")
        for i, pair in enumerate(dev.get("device", {}).get("queue_pairs", [])):
            out.append(f"  pair {i}: " + " ".join(f"{k}={v}" for k, v in pair.items()))
    for name, reason in st.get("failed", {}).items():
        out.append(f"{name}: FAILED: {reason}")
    for setting, ep in st.get("endpoints", {}).items():
        if ep["error"]:
            out.append(f"{setting} {ep['address']}: FAILED: {ep['error']}")
    for line in st.get("unused_sockets", []):
        out.append(f"UNUSED: {line}")
    return "\n".join(out)


@main.command()
@click.argument("socket_path", metavar="SOCKET")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=5.0, show_default=True,
              help="Seconds the whole probe may take.")
def probe(socket_path: str, as_json: bool, timeout: float) -> None:
    """Ask the vhost-user back-end at SOCKET what it offers.

    Connects as a front-end and only asks (features, protocol features,
    queue count, memory slots, config space), then disconnects: no memory
    table, no rings.  Works with any back-end (vhostd, QEMU's, DPDK's,
    qemu-storage-daemon); the device type is guessed from the features.
    """
    from vhostd.probe import ProbeError, probe as run_probe

    try:
        result = run_probe(socket_path, timeout)
    except ProbeError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else result.to_text(), nl=as_json)


# --- vhostd-blk / vhostd-net: the vhost-user.json back-end programs -------------------

def _standalone(command: click.Command) -> Callable[[], None]:
    def run() -> None:
        level = os.environ.get("VHOSTD_LOG_LEVEL", "info")
        _setup_logging(level if level in ("debug", "info", "warning", "error") else "info")
        command(prog_name=f"vhostd-{command.name}")
    return run


blk_main = _standalone(blk)
net_main = _standalone(net)
