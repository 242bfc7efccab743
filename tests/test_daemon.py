"""One daemon, many devices: configuration validation, isolation between
devices, reload, the control socket (status), systemd readiness and socket
activation with the real systemd-socket-activate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vhostd_proc
from vhostd import config
from vhostd.frontend import BlkDriver, DriverRing, Frontend, GuestRam
from vhostd.protocol.constants import ProtocolFeature, Request, VirtioFeature, bit
from unavailable import missing

VHOSTD = [sys.executable, "-m", "vhostd"]
PROTO = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
FEATURES = bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)


# --- configuration ---------------------------------------------------------------

OK_BLK = {"type": "blk", "socket": "/run/x.sock", "file": "/x.img"}


@pytest.mark.parametrize("data, message", [
    ({"devices": {"disk0": {**OK_BLK, "num_queues": 0}}}, "f: devices.disk0.num_queues: 0 is not in 1..8"),
    ({"devices": {"disk0": {**OK_BLK, "num_queues": "2"}}}, "devices.disk0.num_queues: '2' is not a whole number"),
    ({"devices": {"disk0": {**OK_BLK, "read_only": 1}}}, "devices.disk0.read_only: 1 is not a boolean"),
    ({"devices": {"disk0": {**OK_BLK, "colour": "red"}}}, "devices.disk0: unknown key 'colour'"),
    ({"devices": {"disk0": {"socket": "/s", "file": "/f"}}}, "devices.disk0: missing key 'type'"),
    ({"devices": {"disk0": {**OK_BLK, "type": "scsi"}}}, "devices.disk0.type: 'scsi' is not one of blk, net"),
    ({"devices": {"disk0": {"type": "blk", "socket": "/s"}}}, "devices.disk0: missing key 'file'"),
    ({"devices": {"disk0": {**OK_BLK, "aio": "posix"}}}, "devices.disk0.aio: 'posix' is not one of io_uring, sync"),
    ({"devices": {"disk0": {**OK_BLK, "serial": "x" * 21}}}, "devices.disk0.serial: longer than 20 bytes"),
    ({"devices": {"disk0": {**OK_BLK, "discard": "drop"}}}, "devices.disk0.discard: 'drop' is not one of unmap, ignore"),
    ({"devices": {"disk0": {**OK_BLK, "write_cache": "yes"}}}, "devices.disk0.write_cache:"),
    ({"devices": {"disk0": {**OK_BLK, "cpu_affinity": [0, "1"]}}}, "devices.disk0.cpu_affinity:"),
    ({"devices": {"disk0": {**OK_BLK, "poll_us": 5000}}}, "devices.disk0.poll_us: 5000 is not in 0..1000"),
    ({"devices": {"n": {"type": "net", "socket": "/s"}}}, "devices.n: 'tap' is required"),
    ({"devices": {"n": {"type": "net", "socket": "/s", "tap": "t", "queue_pairs": 9}}},
     "devices.n.queue_pairs: 9 is not in 1..8"),
    ({"devices": {"n": {"type": "net", "socket": "/s", "tap": "t", "mac": "01:00:00:00:00:01"}}},
     "devices.n.mac: 01:00:00:00:00:01 is a multicast address"),
    ({"devices": {"n": {"type": "net", "socket": "/s", "tap": "t", "mtu": 10}}}, "devices.n.mtu: 10 is not in 68..65535"),
    ({"devices": {"a": OK_BLK, "b": OK_BLK}}, "devices.b.socket: /run/x.sock is also the socket of devices.a"),
    ({"devices": {"bad name!": OK_BLK}}, "devices.bad name!: device names are"),
    ({"daemon": {"metrics_listen": "9464"}}, "daemon.metrics_listen: '9464' is not HOST:PORT"),
    ({"daemon": {"colour": 1}}, "daemon: unknown key 'colour'"),
    ({"disks": {}}, "f: unknown key 'disks'"),
])
def test_configuration_errors_name_file_device_and_key(data: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(config.ConfigError) as e:
        config.parse(data, "f")
    assert message in str(e.value)


def test_check_config_command(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[devices.d]\ntype = "blk"\nsocket = "/s"\nfile = "/f"\n')
    res = subprocess.run([*VHOSTD, "check-config", str(good)], capture_output=True, text=True)
    assert res.returncode == 0 and "OK, 1 device(s): d (blk)" in res.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[devices.d]\ntype = "blk"\nsocket = "/s"\nfile = "/f"\nnum_queues = 0\n')
    res = subprocess.run([*VHOSTD, "check-config", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and f"{bad}: devices.d.num_queues: 0 is not in 1..8" in res.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[devices.d\n")
    res = subprocess.run([*VHOSTD, "check-config", str(broken)], capture_output=True, text=True)
    assert res.returncode != 0 and "not valid TOML" in res.stderr


# --- a multi-device daemon ------------------------------------------------------------

def _write_config(path: Path, tmp: Path, names: list[str], extra: str = "") -> None:
    text = f'[daemon]\ncontrol_socket = "{tmp}/control.sock"\n'
    for n in names:
        img = tmp / f"{n}.img"
        if not img.exists():
            vhostd_proc.sparse_image(img, 1 << 20)
        text += f'[devices.{n}]\ntype = "blk"\nsocket = "{tmp}/{n}.sock"\nfile = "{img}"\n'
    path.write_text(text + extra)


def _serve(tmp: Path, cfg: Path, env: dict[str, str] | None = None) -> vhostd_proc.Vhostd:
    v = vhostd_proc.Vhostd(["serve", "--config", str(cfg)], None, tmp / "serve.log", env=env)
    _wait(lambda: (tmp / "control.sock").exists(), 10, v)
    return v


def _wait(pred, timeout: float, v: vhostd_proc.Vhostd | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, v.log() if v else "timeout"
        time.sleep(0.02)


def _attach(sock: Path) -> tuple[Frontend, BlkDriver]:
    fe = Frontend(str(sock))
    fe.negotiate(FEATURES, PROTO)
    ram = GuestRam([2 << 20])
    fe.set_mem_table(ram)
    ring = DriverRing(ram, 0, 32)
    fe.start_ring(ring)
    return fe, BlkDriver(ring)


def _status(tmp: Path) -> dict:  # type: ignore[type-arg]
    out = subprocess.run([*VHOSTD, "status", "--json", "--control", str(tmp / "control.sock")],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def test_devices_are_isolated_and_status_shows_their_counters(tmp_path: Path) -> None:
    cfg = tmp_path / "vhostd.toml"
    _write_config(cfg, tmp_path, ["a", "b"], '[devices.broken]\ntype = "blk"\nsocket = '
                  f'"{tmp_path}/broken.sock"\nfile = "{tmp_path}/missing.img"\n')
    with _serve(tmp_path, cfg) as v:
        fe_a, a = _attach(tmp_path / "a.sock")
        fe_b, b = _attach(tmp_path / "b.sock")
        for i in range(10):
            assert a.write(i, b"a" * 512).status == 0 and b.write(i, b"b" * 512).status == 0
        # A protocol violation on a: only a's connection ends.
        fe_a.send(Request.SET_VRING_NUM, b"\0" * 3)
        assert fe_a.is_closed()
        assert b.read(3, 512).data == b"b" * 512
        st = _status(tmp_path)
        devs = {d["name"]: d for d in st["devices"]}
        assert set(devs) == {"a", "b"} and "missing.img" in st["failed"]["broken"]
        assert devs["b"]["frontend"] and devs["b"]["rings"][0]["requests"] >= 11
        assert "VERSION_1" in devs["b"]["features"] and "REPLY_ACK" in devs["b"]["protocol_features"]
        text = subprocess.run([*VHOSTD, "status", "--control", str(tmp_path / "control.sock")],
                              check=True, capture_output=True, text=True).stdout
        assert "b (block) on" in text and "front-end connected" in text and "broken: FAILED" in text
        fe_b.close()
        assert "devices.a" not in v.log()
        assert "a: closing connection: VHOST_USER_SET_VRING_NUM" in v.log()


def test_reload_adds_removes_and_reports_changes(tmp_path: Path) -> None:
    cfg = tmp_path / "vhostd.toml"
    _write_config(cfg, tmp_path, ["keep", "busy", "gone"])
    with _serve(tmp_path, cfg) as v:
        fe, busy = _attach(tmp_path / "busy.sock")
        _write_config(cfg, tmp_path, ["keep", "new"])
        text = cfg.read_text().replace(f'file = "{tmp_path}/keep.img"', f'file = "{tmp_path}/keep.img"\nread_only = true')
        cfg.write_text(text)
        v.proc.send_signal(signal.SIGHUP)
        _wait(lambda: (tmp_path / "new.sock").exists() and not (tmp_path / "gone.sock").exists(), 10, v)
        log = v.log()
        assert "reload: busy: removed from the configuration but a front-end is attached: kept" in log
        assert "reload: keep: changed (read_only): restart this device to apply" in log
        assert busy.write(1, b"x" * 512).status == 0     # the attached device kept running
        res = subprocess.run([*VHOSTD, "reload", "--force", "--control", str(tmp_path / "control.sock")],
                             check=True, capture_output=True, text=True)
        assert "busy: stopped" in res.stdout
        assert fe.is_closed()
        assert {d["name"] for d in _status(tmp_path)["devices"]} == {"keep", "new"}
        fe.close()


def test_a_bad_configuration_on_reload_changes_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "vhostd.toml"
    _write_config(cfg, tmp_path, ["a"])
    with _serve(tmp_path, cfg):
        cfg.write_text("[devices.a]\ntype = 1\n")
        res = subprocess.run([*VHOSTD, "reload", "--control", str(tmp_path / "control.sock")],
                             capture_output=True, text=True)
        assert res.returncode == 1, res.stderr     # so that `systemctl reload` reports it
        assert "reload refused, configuration unchanged" in res.stdout
        assert [d["name"] for d in _status(tmp_path)["devices"]] == ["a"]


# --- systemd ---------------------------------------------------------------------------

def _notify_listener(tmp: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp / "notify.sock"))
    s.settimeout(10)
    return s


def test_sd_notify_ready_status_watchdog_stopping_in_order(tmp_path: Path) -> None:
    cfg = tmp_path / "vhostd.toml"
    _write_config(cfg, tmp_path, ["a", "b"])
    listener = _notify_listener(tmp_path)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    v = _serve(tmp_path, cfg, env=env)
    messages: list[str] = []
    try:
        while len([m for m in messages if "WATCHDOG=1" in m]) < 2:
            messages.append(listener.recv(4096).decode())
        # Both sockets exist when READY=1 is sent.
        assert (tmp_path / "a.sock").exists() and (tmp_path / "b.sock").exists()
    finally:
        assert v.stop() == 0
    listener.settimeout(2)
    try:
        while True:
            messages.append(listener.recv(4096).decode())
    except TimeoutError:
        pass
    listener.close()
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    assert "STATUS=serving 2 device(s)" in messages[ready]
    stopping = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
    assert ready < stopping == len(messages) - 1
    assert any("WATCHDOG=1" in m for m in messages[ready:stopping])


def test_socket_activation_with_systemd_socket_activate(tmp_path: Path) -> None:
    if shutil.which("systemd-socket-activate") is None:
        missing("systemd-socket-activate not installed (systemd)")
    cfg = tmp_path / "vhostd.toml"
    _write_config(cfg, tmp_path, ["disk0"])
    sock = tmp_path / "activated.sock"     # not the path in the config: the passed socket wins
    proc = subprocess.Popen(["systemd-socket-activate", "-l", str(sock), "--fdname=disk0",
                             *VHOSTD, "--log-level", "debug", "serve", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(sock.exists, 10)
        fe, drv = _attach(sock)          # the first connection starts vhostd
        assert drv.write(5, b"s" * 512).status == 0
        fe.close()
        assert not (tmp_path / "disk0.sock").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert "disk0: listening on fd 3" in out, out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_prometheus_metrics_and_top_follow_io(tmp_path: Path) -> None:
    import re
    import urllib.error
    import urllib.request
    port = _free_port()
    cfg = tmp_path / "vhostd.toml"
    _write_config(cfg, tmp_path, ["a"])
    cfg.write_text(cfg.read_text().replace("[daemon]\n", f'[daemon]\nmetrics_listen = "127.0.0.1:{port}"\n'))
    with _serve(tmp_path, cfg) as v:
        _wait(lambda: "metrics on http://" in v.log(), 10, v)
        fe, drv = _attach(tmp_path / "a.sock")
        for i in range(7):
            assert drv.write(i, b"m" * 512).status == 0
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        m = re.search(r'vhostd_ring_requests_total\{device="a",queue="0"\} (\S+)', body)
        assert m and float(m.group(1)) >= 7, body
        assert 'vhostd_device_frontend_connected{device="a",type="block"} 1.0' in body
        assert re.search(r'vhostd_ring_bytes_read_total\{device="a",queue="0"\} (\d+)', body)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
        out = subprocess.run([*VHOSTD, "top", "--count", "2", "--interval", "0.2",
                              "--control", str(tmp_path / "control.sock")],
                             check=True, capture_output=True, text=True).stdout
        assert "req/s" in out and re.search(r"^a\s+0\s", out, re.M), out
        fe.close()


def test_a_device_survives_running_out_of_fds_at_accept(tmp_path: Path) -> None:
    """EMFILE at accept() is logged and retried: the front-end waits in the
    backlog and is served once fds are free again; the device does not fail."""
    from vhd_helpers import Daemon
    d = Daemon()
    try:
        used = d.fd_count()
        hard = subprocess.run(["prlimit", f"--pid={d.pid}", "--nofile", "--noheadings", "--output=HARD"],
                              check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run(["prlimit", f"--pid={d.pid}", f"--nofile={used}:"], check=True)   # the soft limit only
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.sock))              # queued in the backlog; accept() fails
        d.wait_log("blk0: cannot accept a front-end: Too many open files (retrying in 1 s)")
        subprocess.run(["prlimit", f"--pid={d.pid}", f"--nofile={hard}:"], check=True)
        s.close()
        fe = d.connect(timeout=10)
        assert fe.get_u64(Request.GET_QUEUE_NUM) == 1
        fe.close()
        assert d.alive and "device failed" not in d.log()
    finally:
        d.stop()
        d.cleanup()
