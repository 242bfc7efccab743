"""The Debian package, built once per test session with the README's
command (`./dev deb DIR`: a clean copy of the checkout, dpkg-buildpackage,
lintian), for tests/test_deb.py and tests/test_systemd_nspawn.py."""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from unavailable import missing

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Built:
    deb: Path           # vhostd_VERSION_ARCH.deb
    lintian: str        # what lintian printed (tags, one a line)
    log: str            # ./dev deb's own output


def require_deb_build() -> None:
    if os.geteuid() != 0 and shutil.which("dpkg-buildpackage") is None:
        missing("Debian package: dpkg-dev not installed and not root to install it")
    if shutil.which("dpkg-deb") is None:
        missing("Debian package: not a Debian system (no dpkg-deb)")


def _readme_build_command() -> list[str]:
    """The command of the README's block after <!-- test_deb: build -->."""
    text = (ROOT / "README.md").read_text()
    at = text.index("<!-- test_deb: build -->")
    block = re.search(r"```sh\n(.*?)```", text[at:], re.S)
    assert block is not None
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert [line for line in lines if line] == ["./dev deb"], lines
    return ["./dev", "deb"]


@functools.cache
def built() -> Built:
    require_deb_build()
    command = _readme_build_command()
    out = Path(tempfile.mkdtemp(prefix="vhostd-deb-test-", dir="/var/tmp"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    # The README's command, with this session's output directory.
    res = subprocess.run([*command, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, f"./dev deb exited {res.returncode}:\n{res.stdout[-5000:]}\n{res.stderr[-5000:]}"
    debs = sorted(out.glob("vhostd_*.deb"))
    assert len(debs) == 1, sorted(p.name for p in out.iterdir())
    lintian = "\n".join(line for line in res.stdout.splitlines() if line[:3] in ("E: ", "W: ", "I: ", "P: ", "X: "))
    return Built(deb=debs[0], lintian=lintian, log=res.stdout + res.stderr)
