"""The shipped unit files are accepted by systemd-analyze verify, and the
example configuration is valid."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vhostd import config
from unavailable import missing

ROOT = Path(__file__).resolve().parent.parent
UNITS = ["vhostd-blk@.service", "vhostd-net@.service", "vhostd.service",
         "vhostd-blk@.socket", "vhostd-net@.socket", "vhostd@.socket"]


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        missing("systemd-analyze not installed (systemd)")
    # verify checks that ExecStart's binary exists: point it at this checkout's.
    vhostd = Path(sys.executable).parent / "vhostd"
    name = unit.replace("@.", "@test.")
    for other in UNITS:    # a .socket needs its .service next to it
        text = (ROOT / "systemd" / other).read_text()
        (tmp_path / other.replace("@.", "@test.")).write_text(text.replace("/usr/local/bin/vhostd", str(vhostd)))
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)],
                         capture_output=True, text=True, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    # Only complaints about our units count (the host's own units may be odd).
    ours = [line for line in (res.stdout + res.stderr).splitlines() if "vhostd" in line]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr


def test_example_configuration_is_valid() -> None:
    cfg = config.load(ROOT / "systemd" / "vhostd.toml")
    assert [d.name for d in cfg.devices] == ["disk0", "net0"]
