"""The shipped unit files are accepted by systemd-analyze verify."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("unit", ["vhostd-blk@.service", "vhostd-net@.service"])
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing in CI")
        pytest.skip("systemd-analyze not installed")
    text = (ROOT / "systemd" / unit).read_text()
    # verify checks that ExecStart's binary exists: point it at this checkout's.
    vhostd = Path(sys.executable).parent / "vhostd"
    assert "/usr/local/bin/vhostd" in text
    instance = tmp_path / unit.replace("@.", "@test.")
    instance.write_text(text.replace("/usr/local/bin/vhostd", str(vhostd)))
    res = subprocess.run(["systemd-analyze", "verify", str(instance)],
                         capture_output=True, text=True, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    # Only complaints about our unit count (the host's own units may be odd).
    ours = [l for l in (res.stdout + res.stderr).splitlines() if instance.name in l]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr
