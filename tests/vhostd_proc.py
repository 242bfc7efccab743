"""Run vhostd as a real subprocess for tests: wait until it listens, keep
its log, stop it by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence


class Vhostd:
    """`vhostd ARGS` with --log-level debug; `socket` is waited for."""

    def __init__(self, args: Sequence[str], socket: Path | None, log_path: Path,
                 prefix: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.socket = socket
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "vhostd", "--log-level", "debug", *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        if socket is not None:
            self.wait_listening()

    @property
    def listening_socket(self) -> Path:
        """The socket of a vhostd started with one."""
        assert self.socket is not None, "this vhostd was started without a socket to wait for"
        return self.socket

    def wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.socket is not None
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"vhostd exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vhostd did not listen on {self.socket}:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Vhostd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def blk(tmp: Path, image: Path, *extra: str, name: str = "blk0") -> Vhostd:
    sock = tmp / f"{name}.sock"
    return Vhostd(["blk", "--name", name, "--socket-path", str(sock), "--file", str(image), *extra],
                  sock, tmp / f"{name}.log")


def sparse_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
