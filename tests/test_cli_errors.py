"""Operator errors anywhere in the CLI are one line ("Error: ..."), never a
traceback; an endpoint that cannot open (metrics, control socket) fails
alone, with one log line naming the setting, and shows in status; socket
activation that cannot be matched names the fds and what to do."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import vhostd_proc
from unavailable import missing

VHOSTD = [sys.executable, "-m", "vhostd"]


def _run(args: list[str], tmp: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VHOSTD, *args], capture_output=True, text=True, timeout=timeout, cwd=tmp)


def _one_line_error(res: subprocess.CompletedProcess[str], message: str) -> None:
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "Exception Group" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and message in last, res.stderr


def _setup(tmp: Path) -> None:
    (tmp / "img").write_bytes(bytes(1 << 20))
    (tmp / "bad.toml").write_text("[devices.a\n")
    (tmp / "unknown.toml").write_text(f'[devices.a]\ntype = "blk"\nsocket = "{tmp}/a.sock"\n'
                                      f'file = "{tmp}/img"\nfoo = 1\n')
    (tmp / "nocontrol.toml").write_text(f'[devices.a]\ntype = "blk"\nsocket = "{tmp}/a.sock"\n'
                                        f'file = "{tmp}/img"\n')
    (tmp / "bridge.toml").write_text(f'[devices.n]\ntype = "net"\nsocket = "{tmp}/n.sock"\n'
                                     f'tap = "vterr0"\nbridge = "nosuchbridge0"\n')


CASES: list[tuple[list[str], str]] = [
    (["serve", "--state-dir", "/proc/nonexistent"], "cannot set up the default disk: /proc/nonexistent"),
    (["serve", "--config", "bad.toml"], "not valid TOML"),
    (["serve", "--config", "unknown.toml"], "devices.a: unknown key 'foo'"),
    (["serve", "--config", "missing.toml"], "missing.toml: No such file or directory"),
    (["check-config", "unknown.toml"], "unknown key 'foo'"),
    (["blk", "--socket-path", "x.sock", "--file", "missing.img"], "missing.img: No such file or directory"),
    (["blk", "--socket-path", "/proc/x.sock", "--file", "img"], "cannot listen on /proc/x.sock"),
    (["blk", "--fd", "99", "--file", "img"], "cannot listen on fd 99: Bad file descriptor"),
    (["blk", "--fd", "0", "--file", "img"], "cannot listen on fd 0"),
    (["blk", "--socket-path", "x.sock", "--file", "/dev/null"], "not a regular file or block device"),
    (["blk", "--socket-path", "x.sock", "--file", "img", "--socket-group", "nosuchgroup0"], "no group"),
    (["blk", "--socket-path", "x.sock", "--file", "img", "--metrics-listen", "nohostport"], "not HOST:PORT"),
    (["blk", "--socket-path", "x.sock", "--file", "img", "--cpu-affinity", "4096"], "does not exist"),
    (["net", "--socket-path", "x.sock", "--tap", "much-too-long-tap-name"], "must be 1..15 bytes"),
    (["status", "--control", "nothing.sock"], "no control socket"),
    (["reload", "--config", "nocontrol.toml"], "no [daemon] control_socket"),
    (["reload", "--config", "bad.toml"], "not valid TOML"),
    (["top", "--control", "nothing.sock", "--count", "1"], "no control socket"),
    (["probe", "nothing.sock"], "no such socket"),
    (["probe", "img"], "not a socket"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a)[:40] for a, _ in CASES])
def test_operator_errors_are_one_line_without_traceback(args: list[str], message: str, tmp_path: Path) -> None:
    _setup(tmp_path)
    _one_line_error(_run(args, tmp_path), message)


def test_tap_errors_are_one_line(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        missing("tap errors: root and /dev/net/tun needed")
    _setup(tmp_path)
    res = _run(["serve", "--config", "bridge.toml"], tmp_path)
    _one_line_error(res, "bridge nosuchbridge0 does not exist")
    assert "Exception" not in res.stderr


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.05)


def test_endpoints_fail_alone_in_one_line_and_show_in_status(tmp_path: Path) -> None:
    _setup(tmp_path)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    control = tmp_path / "control.sock"
    with busy, vhostd_proc.Vhostd(["blk", "--socket-path", str(tmp_path / "a.sock"), "--file",
                                   str(tmp_path / "img"), "--control-socket", str(control),
                                   "--metrics-listen", f"127.0.0.1:{port}"],
                                  tmp_path / "a.sock", tmp_path / "log") as v:
        _wait(lambda: control.exists(), 10, "control socket")
        # The endpoints open one after the other: the control socket may come first.
        _wait(lambda: "metrics_listen" in v.log(), 10, "metrics error")
        lines = [line for line in v.log().splitlines() if "metrics_listen" in line]
        assert len(lines) == 1 and f"metrics_listen 127.0.0.1:{port}: cannot listen: Address already in use; " \
            "devices are served without it" in lines[0], v.log()
        out = _run(["status", "--control", str(control)], tmp_path)
        assert f"metrics_listen 127.0.0.1:{port}: FAILED: Address already in use" in out.stdout, out.stdout
        st = json.loads(_run(["status", "--json", "--control", str(control)], tmp_path).stdout)
        assert st["endpoints"]["metrics_listen"]["error"] == "Address already in use"
        assert st["devices"][0]["name"] == "blk0"
    with vhostd_proc.Vhostd(["blk", "--socket-path", str(tmp_path / "b.sock"), "--file", str(tmp_path / "img"),
                             "--control-socket", "/proc/nonexistent/control.sock"],
                            tmp_path / "b.sock", tmp_path / "log2") as v:
        _wait(lambda: "control_socket" in v.log(), 10, "control socket error")
        assert "control_socket /proc/nonexistent/control.sock: cannot listen: No such file or directory; " \
            "devices are served without it" in v.log()
        assert v.alive()
    assert "Traceback" not in (tmp_path / "log").read_text() + (tmp_path / "log2").read_text()


def _activate(tmp: Path, cfg: str, listen: list[Path], names: str) -> tuple[subprocess.Popen[str], Path]:
    if shutil.which("systemd-socket-activate") is None:
        missing("systemd-socket-activate not installed (systemd)")
    (tmp / "vhostd.toml").write_text(cfg)
    args = [a for p in listen for a in ("-l", str(p))]
    proc = subprocess.Popen(["systemd-socket-activate", *args, f"--fdname={names}",
                             *VHOSTD, "serve", "--config", str(tmp / "vhostd.toml")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait(lambda: all(p.exists() for p in listen), 10, "activation sockets")
    with socket.socket(socket.AF_UNIX) as s:      # the first connection starts vhostd
        s.connect(str(listen[0]))
    return proc, tmp / "vhostd.toml"


def _device(tmp: Path, name: str) -> str:
    return f'[devices.{name}]\ntype = "blk"\nsocket = "{tmp}/{name}.sock"\nfile = "{tmp}/img"\n'


def test_activation_two_fds_with_one_name_are_an_error_naming_them(tmp_path: Path) -> None:
    _setup(tmp_path)
    proc, _ = _activate(tmp_path, _device(tmp_path, "disk0"),
                        [tmp_path / "s1.sock", tmp_path / "s2.sock"], "disk0:disk0")
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 1, out
    assert "socket activation passed 2 sockets named 'disk0': fd 3 ('disk0', " in out, out
    assert "use one socket unit per device (vhostd@disk0.socket)" in out
    assert out.strip().splitlines()[-1].startswith("Error: no device could be started"), out
    assert "Traceback" not in out


def test_activation_unmatched_fd_and_a_bound_path_are_named(tmp_path: Path) -> None:
    _setup(tmp_path)
    # fd "other" matches no device; fd "x" listens where device b would bind.
    cfg = f'[daemon]\ncontrol_socket = "{tmp_path}/control.sock"\n' + _device(tmp_path, "a") + _device(tmp_path, "b")
    proc, _ = _activate(tmp_path, cfg, [tmp_path / "a-act.sock", tmp_path / "b.sock"], "other:x")
    try:
        _wait(lambda: (tmp_path / "control.sock").exists(), 10, "control socket")
        st = json.loads(_run(["status", "--json", "--control", str(tmp_path / "control.sock")], tmp_path).stdout)
        assert [d["name"] for d in st["devices"]] == ["a"]
        assert "its socket" in st["failed"]["b"] and "FileDescriptorName=b" in st["failed"]["b"], st
        assert any("'other'" in u and "matches no device" in u and "[devices.other]" in u
                   for u in st["unused_sockets"]), st
        text = _run(["status", "--control", str(tmp_path / "control.sock")], tmp_path).stdout
        assert "UNUSED: socket activation fd" in text and "b: FAILED:" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert "Traceback" not in out
