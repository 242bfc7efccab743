"""The command line: the README's main job (`vhostd serve`), --fd,
--print-capabilities, clean exit on signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vhostd_proc
from vhostd.frontend import BlkDriver, DriverRing, Frontend, GuestRam
from vhostd.protocol.constants import ProtocolFeature, bit

VHOSTD = [sys.executable, "-m", "vhostd"]
PROTO = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)


def _blk_roundtrip(sock: Path, sector: int = 7) -> bytes:
    fe = Frontend(str(sock))
    try:
        fe.negotiate(~0, PROTO)
        ram = GuestRam([2 << 20])
        fe.set_mem_table(ram)
        ring = DriverRing(ram, 0, 32)
        fe.start_ring(ring)
        drv = BlkDriver(ring)
        assert drv.write(sector, b"\x5a" * 512).status == 0
        res = drv.read(sector, 512)
        assert res.status == 0
        return res.data
    finally:
        fe.close()


def test_serve_default_creates_image_prints_qemu_options_and_serves(tmp_path: Path) -> None:
    state, run = tmp_path / "state", tmp_path / "run"
    proc = subprocess.Popen([*VHOSTD, "serve", "--state-dir", str(state), "--socket-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sock = run / "disk0.sock"
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        image = state / "disk0.img"
        assert image.stat().st_size == 1 << 30
        assert image.stat().st_blocks == 0          # sparse
        assert oct(sock.stat().st_mode & 0o777) == oct(0o600)
        assert _blk_roundtrip(sock) == b"\x5a" * 512
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert f"-chardev socket,id=vhostd-disk0,path={sock}" in out
    assert "vhost-user-blk-pci,chardev=vhostd-disk0" in out
    assert "memory-backend-memfd" in out and "share=on" in out
    assert not sock.exists(), "socket file left behind"
    with open(state / "disk0.img", "rb") as f:
        f.seek(7 * 512)
        assert f.read(512) == b"\x5a" * 512


def test_sigint_exits_cleanly_while_a_frontend_is_connected(tmp_path: Path) -> None:
    image = vhostd_proc.sparse_image(tmp_path / "d.img", 1 << 20)
    v = vhostd_proc.blk(tmp_path, image)
    fe = Frontend(str(v.socket))
    fe.negotiate(~0, PROTO)
    ram = GuestRam([1 << 20])
    fe.set_mem_table(ram)
    fe.start_ring(DriverRing(ram, 0, 16))
    t = time.monotonic()
    assert v.stop(signal.SIGINT) == 0
    assert time.monotonic() - t < 5
    assert not v.listening_socket.exists()
    assert fe.is_closed()
    fe.close()


def test_inherited_listening_fd(tmp_path: Path) -> None:
    image = vhostd_proc.sparse_image(tmp_path / "d.img", 1 << 20)
    path = tmp_path / "inherited.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(1)
    fd = lsock.fileno()
    os.set_inheritable(fd, True)
    proc = subprocess.Popen([*VHOSTD, "blk", "--fd", str(fd), "--file", str(image)],
                            pass_fds=[fd], stderr=subprocess.PIPE, text=True)
    lsock.close()
    try:
        assert _blk_roundtrip(path, sector=3) == b"\x5a" * 512
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert path.exists(), "vhostd must not remove a socket it did not create"


@pytest.mark.parametrize("kind, expected", [
    ("blk", {"type": "block", "features": ["read-only", "blk-file"]}),
    ("net", {"type": "net", "features": []}),
])
def test_print_capabilities(kind: str, expected: dict[str, object]) -> None:
    out = subprocess.run([*VHOSTD, kind, "--print-capabilities"], check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out) == expected


@pytest.mark.parametrize("args, message", [
    (["blk", "--file", "/nonexistent/x.img", "--socket-path", "/tmp/x.sock"], "No such file"),
    (["blk", "--file", "/etc/hostname"], "exactly one of --socket-path and --fd"),
    (["blk", "--socket-path", "/tmp/x.sock"], "--file is required"),
    (["blk", "--file", "/etc/hostname", "--socket-path", "/tmp/x.sock", "--num-queues", "9"], "9 is not in the range"),
    (["net", "--socket-path", "/tmp/x.sock"], "--tap is required with the tap back-end"),
])
def test_bad_arguments_give_clear_errors(args: list[str], message: str) -> None:
    res = subprocess.run([*VHOSTD, *args], capture_output=True, text=True, timeout=20)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr


@pytest.mark.parametrize("kind, qemu_type", [("blk", "block"), ("net", "net")])
def test_vhost_user_json_descriptor_names_a_working_backend_program(kind: str, qemu_type: str) -> None:
    root = Path(__file__).resolve().parent.parent
    desc = json.loads((root / "share/qemu/vhost-user" / f"50-vhostd-{kind}.json").read_text())
    assert desc["type"] == qemu_type and desc["description"]
    program = Path(desc["binary"]).name
    installed = Path(sys.executable).parent / program   # the same console script, in this venv
    out = subprocess.run([str(installed), "--print-capabilities"], check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out)["type"] == qemu_type
    help_text = subprocess.run([str(installed), "--help"], check=True, capture_output=True, text=True).stdout
    assert "--socket-path" in help_text and "--fd" in help_text
