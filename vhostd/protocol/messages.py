"""vhost-user message codec with validation at the edge.

Every message goes through ``decode()``: header fields, payload size for
the request, and the number of attached fds are checked here, once, against
the table ``SPECS``.  Handlers only ever see well-formed payload objects.
A ``ProtocolError`` means the connection is closed; fds that came with a
rejected message are closed by ``decode()`` before it raises.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Union

from vhostd.fds import OwnedFd, close_all
from vhostd.protocol.constants import (
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_MEM_REGIONS,
    VERSION_MASK,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    HeaderFlag,
    Request,
)


class ProtocolError(Exception):
    """A front-end broke the protocol; the connection must be closed."""

    def __init__(self, request: Request | int | None, reason: str) -> None:
        self.request = request
        self.reason = reason
        super().__init__(f"{describe(request)}: {reason}")


def describe(request: Request | int | None) -> str:
    if request is None:
        return "message"
    if isinstance(request, Request):
        return request.spec_name
    try:
        return Request(request).spec_name
    except ValueError:
        return f"request {request}"


_HEADER = struct.Struct("<III")


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    def pack(self) -> bytes:
        return _HEADER.pack(self.request, self.flags, self.size)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        return cls(*_HEADER.unpack(data))

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlag.NEED_REPLY)


# --- payloads -------------------------------------------------------------

@dataclass(frozen=True)
class U64:
    value: int
    _S = struct.Struct("<Q")

    def pack(self) -> bytes:
        return self._S.pack(self.value)

    @classmethod
    def unpack(cls, data: bytes) -> U64:
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True)
class VringState:
    index: int
    num: int
    _S = struct.Struct("<II")

    def pack(self) -> bytes:
        return self._S.pack(self.index, self.num)

    @classmethod
    def unpack(cls, data: bytes) -> VringState:
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int
    _S = struct.Struct("<IIQQQQ")

    def pack(self) -> bytes:
        return self._S.pack(self.index, self.flags, self.desc_user_addr,
                            self.used_user_addr, self.avail_user_addr, self.log_guest_addr)

    @classmethod
    def unpack(cls, data: bytes) -> VringAddr:
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True)
class MemRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    _S = struct.Struct("<QQQQ")

    def pack(self) -> bytes:
        return self._S.pack(self.guest_phys_addr, self.memory_size,
                            self.userspace_addr, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> MemRegion:
        return cls(*cls._S.unpack(data))


REGION_SIZE = MemRegion._S.size


@dataclass(frozen=True)
class MemTable:
    regions: tuple[MemRegion, ...]
    _S = struct.Struct("<II")

    def pack(self) -> bytes:
        return self._S.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> MemTable:
        n, _padding = cls._S.unpack_from(data)
        if n > MAX_MEM_REGIONS:
            raise ValueError(f"{n} memory regions, at most {MAX_MEM_REGIONS}")
        if len(data) != cls._S.size + n * REGION_SIZE:
            raise ValueError(f"payload of {len(data)} bytes for {n} regions")
        regions = tuple(MemRegion.unpack(data[8 + i * REGION_SIZE: 8 + (i + 1) * REGION_SIZE])
                        for i in range(n))
        return cls(regions)


@dataclass(frozen=True)
class MemRegMsg:
    """ADD_MEM_REG / REM_MEM_REG: one region (after 8 bytes of padding)."""

    region: MemRegion
    _S = struct.Struct("<Q")

    def pack(self) -> bytes:
        return self._S.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> MemRegMsg:
        if len(data) != cls._S.size + REGION_SIZE:
            raise ValueError(f"payload of {len(data)} bytes, expected {cls._S.size + REGION_SIZE}")
        return cls(MemRegion.unpack(data[cls._S.size:]))


@dataclass(frozen=True)
class Config:
    offset: int
    size: int
    flags: int
    data: bytes
    _S = struct.Struct("<III")

    def pack(self) -> bytes:
        return self._S.pack(self.offset, self.size, self.flags) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> Config:
        offset, size, flags = cls._S.unpack_from(data)
        if size > MAX_CONFIG_SIZE:
            raise ValueError(f"config size {size} > {MAX_CONFIG_SIZE}")
        if len(data) != cls._S.size + size:
            raise ValueError(f"payload of {len(data)} bytes for {size} config bytes")
        return cls(offset, size, flags, bytes(data[cls._S.size:]))


@dataclass(frozen=True)
class Inflight:
    """GET/SET_INFLIGHT_FD: the shared buffer for inflight I/O tracking."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    _S = struct.Struct("<QQHH4x")

    def pack(self) -> bytes:
        return self._S.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    @classmethod
    def unpack(cls, data: bytes) -> Inflight:
        return cls(*cls._S.unpack(data))


@dataclass(frozen=True)
class LogBase:
    """SET_LOG_BASE: where in the attached fd the dirty-page bitmap is."""

    mmap_size: int
    mmap_offset: int
    _S = struct.Struct("<QQ")

    def pack(self) -> bytes:
        return self._S.pack(self.mmap_size, self.mmap_offset)

    @classmethod
    def unpack(cls, data: bytes) -> LogBase:
        return cls(*cls._S.unpack(data))


Payload = Union[None, U64, VringState, VringAddr, MemTable, MemRegMsg, Config, Inflight, LogBase]


class PayloadKind(enum.Enum):
    NONE = None
    U64 = U64
    VRING_STATE = VringState
    VRING_ADDR = VringAddr
    MEM_TABLE = MemTable
    MEM_REG = MemRegMsg
    CONFIG = Config
    INFLIGHT = Inflight
    LOG_BASE = LogBase

    def size_ok(self, size: int) -> bool:
        if self is PayloadKind.NONE:
            return size == 0
        if self is PayloadKind.MEM_TABLE:
            return 8 <= size <= 8 + MAX_MEM_REGIONS * REGION_SIZE
        if self is PayloadKind.CONFIG:
            return 12 <= size <= 12 + MAX_CONFIG_SIZE
        if self is PayloadKind.MEM_REG:
            return size == 8 + REGION_SIZE
        return bool(size == self.value._S.size)


class Fds(enum.Enum):
    """How many fds a request may carry."""

    NONE = "none"
    ONE = "one"
    VRING = "one unless the no-fd flag is set"     # SET_VRING_KICK/CALL/ERR
    PER_REGION = "one per memory region"
    OPTIONAL = "none, or one that is closed unused"   # REM_MEM_REG (vhost-user.rst allows it)


@dataclass(frozen=True)
class Spec:
    payload: PayloadKind
    fds: Fds = Fds.NONE
    reply: PayloadKind | None = None   # the request always has this reply


P, F = PayloadKind, Fds
# Requests vhostd understands.  Anything else closes the connection: we do
# not advertise the protocol features that would make a front-end send it.
SPECS: dict[Request, Spec] = {
    Request.GET_FEATURES: Spec(P.NONE, reply=P.U64),
    Request.SET_FEATURES: Spec(P.U64),
    Request.SET_OWNER: Spec(P.NONE),
    Request.RESET_OWNER: Spec(P.NONE),
    Request.SET_MEM_TABLE: Spec(P.MEM_TABLE, F.PER_REGION),
    Request.SET_LOG_BASE: Spec(P.LOG_BASE, F.ONE, reply=P.U64),
    Request.SET_LOG_FD: Spec(P.NONE, F.ONE),
    Request.SET_VRING_NUM: Spec(P.VRING_STATE),
    Request.SET_VRING_ADDR: Spec(P.VRING_ADDR),
    Request.SET_VRING_BASE: Spec(P.VRING_STATE),
    Request.GET_VRING_BASE: Spec(P.VRING_STATE, reply=P.VRING_STATE),
    Request.SET_VRING_KICK: Spec(P.U64, F.VRING),
    Request.SET_VRING_CALL: Spec(P.U64, F.VRING),
    Request.SET_VRING_ERR: Spec(P.U64, F.VRING),
    Request.GET_PROTOCOL_FEATURES: Spec(P.NONE, reply=P.U64),
    Request.SET_PROTOCOL_FEATURES: Spec(P.U64),
    Request.GET_QUEUE_NUM: Spec(P.NONE, reply=P.U64),
    Request.SET_VRING_ENABLE: Spec(P.VRING_STATE),
    Request.GET_CONFIG: Spec(P.CONFIG, reply=P.CONFIG),
    Request.SET_CONFIG: Spec(P.CONFIG),
    Request.GET_MAX_MEM_SLOTS: Spec(P.NONE, reply=P.U64),
    Request.SET_BACKEND_REQ_FD: Spec(P.NONE, F.ONE),
    Request.ADD_MEM_REG: Spec(P.MEM_REG, F.ONE),
    Request.REM_MEM_REG: Spec(P.MEM_REG, F.OPTIONAL),
    Request.NET_SET_MTU: Spec(P.U64),
    Request.SEND_RARP: Spec(P.U64),
    Request.GET_INFLIGHT_FD: Spec(P.INFLIGHT, reply=P.INFLIGHT),
    Request.SET_INFLIGHT_FD: Spec(P.INFLIGHT, F.ONE),
}
del P, F


@dataclass
class Message:
    header: Header
    request: Request
    payload: Payload
    fds: list[OwnedFd] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return self.header.need_reply


def expected_fds(spec: Spec, payload: Payload) -> int:
    match spec.fds:
        case Fds.NONE:
            return 0
        case Fds.ONE:
            return 1
        case Fds.VRING:
            assert isinstance(payload, U64)
            return 0 if payload.value & VRING_NOFD_MASK else 1
        case Fds.PER_REGION:
            assert isinstance(payload, MemTable)
            return len(payload.regions)
        case Fds.OPTIONAL:
            return 0


def check_header(header: Header) -> Request:
    """Validates what can be checked before the payload is read."""
    try:
        request = Request(header.request)
    except ValueError:
        raise ProtocolError(header.request, "unknown request") from None
    if header.flags & VERSION_MASK != HeaderFlag.VERSION:
        raise ProtocolError(request, f"unsupported version in flags {header.flags:#x}")
    if header.flags & HeaderFlag.REPLY:
        raise ProtocolError(request, "reply flag set on a request")
    spec = SPECS.get(request)
    if spec is None:
        raise ProtocolError(request, "request not supported by this back-end")
    if not spec.payload.size_ok(header.size):
        raise ProtocolError(request, f"payload size {header.size} is invalid for this request")
    return request


def decode(header: Header, payload: bytes, fds: list[OwnedFd]) -> Message:
    """Builds a validated message; on any error closes fds and raises."""
    try:
        request = check_header(header)
        spec = SPECS[request]
        if len(payload) != header.size:
            raise ProtocolError(request, f"got {len(payload)} payload bytes, header says {header.size}")
        try:
            body = None if spec.payload.value is None else spec.payload.value.unpack(payload)
        except (ValueError, struct.error) as e:
            raise ProtocolError(request, str(e)) from None
        want = expected_fds(spec, body)
        if spec.fds is Fds.OPTIONAL and len(fds) == 1:
            close_all(fds)      # allowed for compatibility; never used
            fds = []
        if len(fds) != want:
            raise ProtocolError(request, f"carries {len(fds)} fds, expected {want}")
        return Message(header, request, body, fds)
    except BaseException:
        close_all(fds)
        raise


def vring_index_of(payload: U64) -> tuple[int, bool]:
    """SET_VRING_KICK/CALL/ERR: (ring index, no-fd flag); other bits must be 0."""
    if payload.value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise ValueError(f"reserved bits set in {payload.value:#x}")
    return payload.value & VRING_IDX_MASK, bool(payload.value & VRING_NOFD_MASK)


def encode_request(request: Request, payload: bytes = b"", need_reply: bool = False) -> bytes:
    flags = HeaderFlag.VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
    return Header(request, flags, len(payload)).pack() + payload


def encode_reply(request: Request, payload: bytes) -> bytes:
    return Header(request, HeaderFlag.VERSION | HeaderFlag.REPLY, len(payload)).pack() + payload
