"""Operations under a running guest: `vhostd serve --config` with several
devices; while the guest runs fio on one of them, `vhostd status` counters
move, and a reload adds and removes other devices without disturbing it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import guestvm
import vhostd_proc

pytestmark = pytest.mark.guest
VHOSTD = [sys.executable, "-m", "vhostd"]


def _status(control: Path) -> dict:  # type: ignore[type-arg]
    out = subprocess.run([*VHOSTD, "status", "--json", "--control", str(control)],
                         check=True, capture_output=True, text=True).stdout
    return {d["name"]: d for d in json.loads(out)["devices"]}


def _config(tmp: Path, names: list[str]) -> str:
    text = f'[daemon]\ncontrol_socket = "{tmp}/control.sock"\n'
    for n in names:
        img = tmp / f"{n}.img"
        if not img.exists():
            vhostd_proc.sparse_image(img, 64 << 20)
        text += f'[devices.{n}]\ntype = "blk"\nsocket = "{tmp}/{n}.sock"\nfile = "{img}"\n'
    return text


def test_status_moves_and_reload_leaves_a_running_guest_alone(tmp_path: Path) -> None:
    guestvm.require_guest()
    cfg = tmp_path / "vhostd.toml"
    cfg.write_text(_config(tmp_path, ["guestdisk", "old"]))
    control = tmp_path / "control.sock"
    v = vhostd_proc.Vhostd(["serve", "--config", str(cfg)], tmp_path / "guestdisk.sock", tmp_path / "serve.log")
    script = ("echo FIO-RUNNING; fio --name=ops --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=16 "
              "--ioengine=libaio --direct=1 --size=16M --time_based --runtime=12 --verify=crc32c "
              "--verify_backlog=128 --verify_fatal=1 --output-format=terse > /tmp/fio.out; "
              "echo FIO-ERR $(grep -v '^fio:' /tmp/fio.out | cut -d';' -f5)")
    try:
        with guestvm.start_guest(script, guestvm.vhost_user_blk_args(tmp_path / "guestdisk.sock"),
                                 timeout=180) as g:
            assert g.wait_for("FIO-RUNNING", 90), g.console
            time.sleep(2)
            first = _status(control)["guestdisk"]["rings"][0]["requests"]
            time.sleep(1)
            st = _status(control)
            assert st["guestdisk"]["frontend"] and st["guestdisk"]["rings"][0]["requests"] > first > 0
            cfg.write_text(_config(tmp_path, ["guestdisk", "new"]))
            out = subprocess.run([*VHOSTD, "reload", "--control", str(control)],
                                 check=True, capture_output=True, text=True).stdout
            assert "old: stopped" in out and "new: started" in out, out
            assert set(_status(control)) == {"guestdisk", "new"}
            res = g.result()
        assert res.rc == 0 and "FIO-ERR 0" in res.output, res.describe()
        assert v.log().count("guestdisk: front-end connected") == 1
    finally:
        v.stop()
