"""Reading and writing vhost-user messages on a trio Unix socket.

Fds travel as SCM_RIGHTS with the first bytes of a message.  They are
received with MSG_CMSG_CLOEXEC and wrapped in ``OwnedFd`` immediately, so
every exit path can close them; a truncated control message (more fds than
any request may carry) is a protocol error.
"""

from __future__ import annotations

import array
import socket

import trio

from vhostd.fds import OwnedFd, close_all
from vhostd.protocol.constants import HEADER_SIZE, MAX_MEM_REGIONS, MAX_PAYLOAD
from vhostd.protocol.messages import Header, Message, ProtocolError, check_header, decode

_FD_SIZE = array.array("i").itemsize
# Room for one more fd than any request may carry, so "too many" is visible.
_CMSG_SPACE = socket.CMSG_SPACE((MAX_MEM_REGIONS + 1) * _FD_SIZE)


class Disconnected(Exception):
    """The front-end closed the connection at a message boundary."""


class Channel:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    async def _recv_exact(self, n: int, fds: list[OwnedFd], what: str) -> tuple[bytes, bool]:
        """n bytes, and whether fds were lost (control data truncated)."""
        buf = bytearray()
        truncated = False
        while len(buf) < n:
            data, ancdata, flags, _ = await self.sock.recvmsg(
                n - len(buf), _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
            fds.extend(_fds_from(ancdata))
            truncated = truncated or bool(flags & socket.MSG_CTRUNC)
            if not data:
                if not buf and what == "header":
                    raise Disconnected()
                raise ProtocolError(None, f"connection closed inside a message {what}")
            buf += data
        return bytes(buf), truncated

    async def recv(self) -> Message:
        """Next validated message; raises Disconnected or ProtocolError."""
        fds: list[OwnedFd] = []
        header: Header | None = None
        try:
            try:
                raw, truncated = await self._recv_exact(HEADER_SIZE, fds, "header")
                header = Header.unpack(raw)
                payload = b""
                if not truncated:
                    if header.size > MAX_PAYLOAD:
                        raise ProtocolError(header.request, f"payload size {header.size} > {MAX_PAYLOAD}")
                    check_header(header)   # reject before reading a payload we would not accept
                    if header.size:
                        payload, truncated = await self._recv_exact(header.size, fds, "payload")
                if truncated:
                    raise ProtocolError(None, "too many fds attached (control data truncated)")
            except ProtocolError as e:
                if e.request is None and header is not None:   # name the request in the log
                    raise ProtocolError(header.request, e.reason) from None
                raise
        except BaseException:
            close_all(fds)
            raise
        return decode(header, payload, fds)

    async def send(self, data: bytes, fds: list[int] | None = None) -> None:
        view = memoryview(data)
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            n = await self.sock.sendmsg([view], anc)
            view = view[n:]
        while view:
            n = await self.sock.send(view)
            view = view[n:]


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[OwnedFd]:
    fds: list[OwnedFd] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
            fds.extend(OwnedFd(fd) for fd in arr)
    return fds
