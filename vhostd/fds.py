"""File descriptors as owned objects.

A raw fd number is reused by the kernel as soon as it is closed, so code
that keeps a number after closing it can end up touching someone else's
file.  ``OwnedFd`` closes exactly once and forgets the number.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


class OwnedFd:
    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"invalid fd {fd}")
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("fd already closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def release(self) -> int:
        """Hands the fd over to a new owner (e.g. a socket object)."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OwnedFd({self._fd})"


def close_all(fds: Iterable[OwnedFd | None]) -> None:
    for fd in fds:
        if fd is not None:
            fd.close()
