"""Command line (QEMU's vhost-user back-end program conventions:
--socket-path / --fd, --print-capabilities, never daemonize)."""

from __future__ import annotations

import grp
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import trio

from vhostd.daemon import DeviceServer, Listener, run_daemon
from vhostd.vring import WorkerOptions
from vhostd.backends.tap import TapError
from vhostd.devices.blk import MAX_QUEUES, BlkDevice, BlkOptions, Engine
from vhostd.devices.net import MAX_QUEUE_PAIRS, NetDevice, NetOptions, format_mac, parse_mac

DEFAULT_IMAGE_SIZE = 1 << 30


def _setup_logging(level: str) -> None:
    # journald adds its own timestamps; a terminal gets them from us.
    fmt = "%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s vhostd %(levelname)s %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True, help="Least severe messages to log.")
def main(log_level: str) -> None:
    """vhostd: a vhost-user back-end for virtio-blk and virtio-net devices.

    QEMU connects to vhostd's Unix socket and shares guest memory; vhostd
    moves the data in native threads.  `vhostd serve` starts a default disk;
    `vhostd blk` serves one disk image or block device, `vhostd net` one
    NIC on a tap device.
    """
    _setup_logging(log_level)


F = TypeVar("F", bound=Callable[..., Any])


def endpoint_options(f: F) -> F:
    """--socket-path / --fd / --client, shared by every device command."""
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
    """--poll-us and --cpu-affinity, shared by every device command."""
    f = click.option("--poll-us", type=click.IntRange(0, 1000), default=0, show_default=True,
                     help="After a burst, busy-poll the ring this long before sleeping "
                          "(lower latency, more CPU; an idle device never polls).")(f)
    f = click.option("--cpu-affinity", "cpus", default="",
                     help="Comma-separated CPUs for the ring workers (ring i gets the "
                          "i-th, cycling) [default: no pinning].")(f)
    return f


def _workers(poll_us: int, cpus: str) -> WorkerOptions:
    try:
        cpu_list = tuple(int(c) for c in cpus.split(",") if c.strip())
    except ValueError:
        raise click.BadParameter(f"{cpus!r} is not a comma-separated list of CPU numbers",
                                 param_hint="--cpu-affinity") from None
    bad = [c for c in cpu_list if not 0 <= c < (os.cpu_count() or 1)]
    if bad:
        raise click.BadParameter(f"CPU {bad[0]} does not exist here", param_hint="--cpu-affinity")
    return WorkerOptions(poll_us=poll_us, cpus=cpu_list)


def _listener(socket_path: Path | None, fd: int | None, client: bool = False,
              socket_group: str | None = None) -> Listener:
    if (socket_path is None) == (fd is None):
        raise click.UsageError("give exactly one of --socket-path and --fd")
    if client and fd is not None:
        raise click.UsageError("--client connects to --socket-path; it cannot use --fd")
    gid = None
    if socket_group is not None:
        try:
            gid = grp.getgrnam(socket_group).gr_gid
        except KeyError:
            raise click.BadParameter(f"no group {socket_group!r}", param_hint="--socket-group") from None
    return Listener(socket_path=socket_path, fd=fd, client=client, group=gid)


def _run(servers: list[DeviceServer], banner: str | None = None) -> None:
    for s in servers:
        try:
            s.listener.open()
        except OSError as e:
            raise click.ClickException(f"{s.device.name}: cannot listen on {s.listener.describe()}: {e}")

    def ready() -> None:
        for s in servers:
            logging.getLogger("vhostd").info("%s: listening on %s", s.device.name, s.listener.describe())
        if banner:
            click.echo(banner)

    trio.run(run_daemon, servers, ready)


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
@click.option("--name", default="blk0", show_default=True, help="Device name used in logs.")
@click.option("--print-capabilities", is_flag=True,
              help="Print the back-end's capabilities as JSON (vhost-user.rst) and exit.")
@worker_options
def blk(socket_path: Path | None, socket_group: str | None, fd: int | None, client: bool, file: Path | None, read_only: bool,
        num_queues: int, serial: str, engine: str, direct: bool, name: str,
        print_capabilities: bool, poll_us: int, cpus: str) -> None:
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
    listener = _listener(socket_path, fd, client, socket_group)
    try:
        device = BlkDevice(name, BlkOptions(path=file, read_only=read_only, num_queues=num_queues,
                                            serial=serial, engine=Engine(engine), direct=direct),
                           _workers(poll_us, cpus))
    except ValueError as e:
        raise click.ClickException(f"{name}: {e}")
    _run([DeviceServer(device, listener)])


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


@main.command()
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Where the default disk image lives [default: $STATE_DIRECTORY, "
                   "/var/lib/vhostd as root, ~/.local/state/vhostd otherwise].")
@click.option("--socket-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Where the sockets are created [default: $RUNTIME_DIRECTORY, "
                   "/run/vhostd as root, $XDG_RUNTIME_DIR/vhostd otherwise].")
def serve(state_dir: Path | None, socket_dir: Path | None) -> None:
    """Serve the built-in default: one disk (disk0) on a sparse 1 GiB image.

    The image is created on first start in the state directory and kept
    across restarts.  The QEMU options that attach a guest are printed.
    """
    default_state, default_run = _default_dirs()
    state_dir = state_dir or default_state
    socket_dir = socket_dir or default_run
    for d in (state_dir, socket_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    image = state_dir / "disk0.img"
    if not image.exists():
        with open(image, "wb") as f:
            f.truncate(DEFAULT_IMAGE_SIZE)
        logging.getLogger("vhostd").info("created sparse %d MiB image %s", DEFAULT_IMAGE_SIZE >> 20, image)
    num_queues = min(2, os.cpu_count() or 1)
    sock = socket_dir / "disk0.sock"
    device = BlkDevice("disk0", BlkOptions(path=image, num_queues=num_queues, serial="vhostd-disk0"))
    banner = (f"vhostd: serving disk0 ({image}, {DEFAULT_IMAGE_SIZE >> 30} GiB) on {sock}\n"
              f"Attach a QEMU guest with:\n  qemu-system-x86_64 ... {qemu_blk_options(sock, num_queues)}\n"
              "Stop with Ctrl-C or SIGTERM.")
    _run([DeviceServer(device, Listener(socket_path=sock))], banner)


@main.command()
@endpoint_options
@click.option("--tap", help="Tap device: attached to if it exists, else created (and removed on exit).")
@click.option("--backend", type=click.Choice(["tap", "null"]), default="tap", show_default=True,
              help="null: discard guest TX and fill guest RX buffers with a generated 60-byte "
                   "frame, for benchmarks and tests (no tap).")
@click.option("--bridge", help="Bridge to enslave the tap to.")
@click.option("--mtu", type=click.IntRange(68, 65535), help="MTU to set on the tap (the guest learns it via NET_SET_MTU / config).")
@click.option("--mac", help="Guest MAC in config space [default: stable, derived from the tap name].")
@click.option("--queue-pairs", type=click.IntRange(1, MAX_QUEUE_PAIRS), default=1, show_default=True,
              help="RX/TX queue pairs (multi-queue tap).")
@click.option("--name", default="net0", show_default=True, help="Device name used in logs.")
@click.option("--print-capabilities", is_flag=True,
              help="Print the back-end's capabilities as JSON (vhost-user.rst) and exit.")
@worker_options
def net(socket_path: Path | None, socket_group: str | None, fd: int | None, client: bool, tap: str | None, backend: str, bridge: str | None,
        mtu: int | None, mac: str | None, queue_pairs: int, name: str, print_capabilities: bool,
        poll_us: int, cpus: str) -> None:
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
    listener = _listener(socket_path, fd, client, socket_group)
    try:
        options = NetOptions(tap=tap, queue_pairs=queue_pairs, mtu=mtu,
                             mac=parse_mac(mac) if mac else None, bridge=bridge)
        device = NetDevice(name, options, _workers(poll_us, cpus))
    except (ValueError, TapError, OSError) as e:
        raise click.ClickException(f"{name}: {e}")
    where = (f"tap {tap} ({'created' if device.tap.created else 'attached'})"
             if device.tap else "null back-end")
    logging.getLogger("vhostd").info("%s: %s, mac %s", name, where, format_mac(device.mac))
    _run([DeviceServer(device, listener)])
