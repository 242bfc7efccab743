"""The local control socket: one JSON object per line each way.

    {"command": "status"}                 -> {"ok": true, "status": {...}}
    {"command": "reload", "force": false} -> {"ok": true, "report": ["..."]}

The socket is created 0600: whoever can use it can stop devices.  The
daemon side is a trio task; ``request()`` is the synchronous client the
CLI (`vhostd status`, `vhostd reload`, `vhostd top`) uses.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_REQUEST = 64 * 1024


class ControlError(Exception):
    pass


def listen(path: Path) -> trio.socket.SocketType:
    """Binds the control socket (mode 0600 before anyone can connect); raises
    OSError, for the daemon to report."""
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(8)
    except OSError:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


async def serve(sock: trio.socket.SocketType, path: Path, handler: Handler) -> None:
    """Answers requests on a socket from listen() until cancelled; removes
    the socket file afterwards."""
    try:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(_handle, conn, handler)
    finally:
        sock.close()
        try:
            path.unlink()
        except FileNotFoundError:
            pass


async def _handle(conn: trio.socket.SocketType, handler: Handler) -> None:
    with conn:
        buf = b""
        while b"\n" not in buf and len(buf) < MAX_REQUEST:
            data = await conn.recv(4096)
            if not data:
                return
            buf += data
        try:
            req = json.loads(buf.split(b"\n", 1)[0])
            if not isinstance(req, dict) or not isinstance(req.get("command"), str):
                raise ValueError("expected {\"command\": ...}")
            reply = await handler(req)
        except (ValueError, ControlError) as e:
            reply = {"ok": False, "error": str(e)}
        data = (json.dumps(reply) + "\n").encode()
        while data:
            n = await conn.send(data)
            data = data[n:]


def request(path: Path, command: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Sends one command; raises ControlError with a readable reason."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise ControlError(f"{path}: no control socket (is vhostd serve running?)") from None
        except ConnectionRefusedError:
            raise ControlError(f"{path}: nobody is listening (stale socket?)") from None
        except OSError as e:
            raise ControlError(f"{path}: {e.strerror or e}") from None
        buf = b""
        try:
            s.sendall((json.dumps({"command": command, **args}) + "\n").encode())
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise ControlError(f"{path}: no reply within {timeout:g} s") from None
        except OSError as e:
            raise ControlError(f"{path}: {e.strerror or e}") from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError(f"{path}: malformed reply") from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "request failed"))
    return dict(reply)
