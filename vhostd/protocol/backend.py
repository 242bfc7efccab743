"""The back-end channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ, "slave" in QEMU
7.2): a socket the front-end hands over with SET_BACKEND_REQ_FD, on which
the back-end sends requests of its own, e.g. BACKEND_CONFIG_CHANGE_MSG when
a disk was resized.

A front-end may never answer, answer late, close the socket or answer with
an error; none of it may hold up the session (QEMU answers a config change
only after reading the new config with GET_CONFIG on the main channel, so
the session must keep serving while we wait) or the daemon.  Every request
has a timeout and every failure is a value the caller logs.
"""

from __future__ import annotations

import enum
import logging
import socket
import struct

import trio

from vhostd.fds import OwnedFd
from vhostd.protocol.constants import HEADER_SIZE, HeaderFlag

log = logging.getLogger("vhostd.backend")
REPLY_TIMEOUT_S = 5.0


class BackendRequest(enum.IntEnum):
    """Back-end -> front-end requests (vhost-user.rst "Back-end message types")."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class BackendChannelError(Exception):
    pass


class BackendChannel:
    def __init__(self, fd: OwnedFd, reply_ack: bool) -> None:
        """Takes fd (a connected Unix stream socket); reply_ack: REPLY_ACK was
        negotiated, so requests ask for an answer."""
        self._sock = trio.socket.from_stdlib_socket(
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fd.release()))
        self._reply_ack = reply_ack
        self._lock = trio.Lock()
        self.closed = False

    async def request(self, request: BackendRequest, payload: bytes = b"") -> None:
        """Sends a request and, with REPLY_ACK, waits for the front-end's
        status; raises BackendChannelError naming what went wrong."""
        if self.closed:
            raise BackendChannelError("the back-end channel is closed")
        async with self._lock:
            flags = HeaderFlag.VERSION | (HeaderFlag.NEED_REPLY if self._reply_ack else 0)
            data = struct.pack("<III", request, flags, len(payload)) + payload
            try:
                with trio.fail_after(REPLY_TIMEOUT_S):
                    while data:
                        data = data[await self._sock.send(data):]
                    if not self._reply_ack:
                        return
                    status = await self._read_reply(request)
            except trio.TooSlowError:
                self.close()   # a late answer would be taken for the next request's
                raise BackendChannelError(f"no answer to {request.name} within {REPLY_TIMEOUT_S:g} s: "
                                          f"channel closed") from None
            except OSError as e:
                self.close()
                raise BackendChannelError(f"{request.name}: {e.strerror or e}") from None
        if status != 0:
            raise BackendChannelError(f"the front-end refused {request.name} (status {status})")

    async def _read_reply(self, request: BackendRequest) -> int:
        buf = b""
        while len(buf) < HEADER_SIZE + 8:
            chunk = await self._sock.recv(HEADER_SIZE + 8 - len(buf))
            if not chunk:
                self.close()
                raise BackendChannelError(f"the front-end closed the back-end channel during {request.name}")
            buf += chunk
        req, flags, size = struct.unpack_from("<III", buf)
        if req != request or not flags & HeaderFlag.REPLY or size != 8:
            self.close()
            raise BackendChannelError(f"malformed answer to {request.name} (request {req}, flags {flags:#x}, "
                                      f"size {size}): channel closed")
        return int(struct.unpack_from("<Q", buf, HEADER_SIZE)[0])

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()
