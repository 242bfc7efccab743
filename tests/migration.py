"""Live migration between two QEMUs on one host, for the tests and the
`migrate` benchmark: the destination's command line, and waiting for
QMP `query-migrate` to end."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import guestvm
from qmp import Qmp


class MigrationTimeout(RuntimeError):
    pass


def qmp_args(path: Path) -> list[str]:
    return ["-qmp", f"unix:{path},server=on,wait=off"]


def destination(src: guestvm.Guest, device_args: Sequence[str], qmp: Path, mig: Path,
                workdir: Path, timeout: float = 300) -> guestvm.Guest:
    """The source's command line with other device and QMP arguments, plus
    -incoming (start_guest puts the device arguments after -fw_cfg)."""
    cmd = list(src.cmd)
    i = cmd.index("-fw_cfg")
    del cmd[i + 2:]
    workdir.mkdir()
    # The source's workdir goes when it exits: the script file must outlive it.
    name, _, script = cmd[i + 1].partition(",file=")
    shutil.copy(script, workdir / "script.sh")
    cmd[i + 1] = f"{name},file={workdir / 'script.sh'}"
    return guestvm.Guest([*cmd, *device_args, *qmp_args(qmp), "-incoming", f"unix:{mig}"],
                         workdir, timeout=timeout)


def wait_migration(qmp: Qmp, timeout: float = 180, poll: float = 0.1) -> dict[str, Any]:
    """query-migrate once it completed, failed or was cancelled."""
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = dict(qmp.command("query-migrate"))
        if st.get("status") in ("completed", "failed", "cancelled"):
            return st
        time.sleep(poll)
    raise MigrationTimeout(f"migration did not finish in {timeout:.0f} s: {st}")


def console_rc(console: str) -> int | None:
    """The script's exit status from a console that may lack the start marker
    (a destination's console begins mid-script)."""
    m = re.search(re.escape(guestvm.END_MARKER) + r" rc=(\d+)", console)
    return int(m.group(1)) if m else None
