"""Numbers from the vhost-user spec (QEMU docs/interop/vhost-user.rst) and virtio 1.2."""

from __future__ import annotations

import enum


class Request(enum.IntEnum):
    """Front-end requests (``VHOST_USER_*``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40

    @property
    def spec_name(self) -> str:
        return f"VHOST_USER_{self.name}"


class HeaderFlag(enum.IntFlag):
    VERSION = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


VERSION_MASK = 0x3
HEADER_SIZE = 12
# Largest payload any request we accept can carry (GET/SET_CONFIG: 12 + 256).
MAX_PAYLOAD = 4096
# VHOST_MEMORY_BASELINE_NREGIONS: SET_MEM_TABLE carries at most 8 regions/fds.
MAX_MEM_REGIONS = 8
MAX_QUEUE_SIZE = 32768
MAX_CONFIG_SIZE = 256

# SET_VRING_KICK/CALL/ERR u64 payload: bits 0-7 ring index, bit 8 "no fd".
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100


class ProtocolFeature(enum.IntEnum):
    """``VHOST_USER_PROTOCOL_F_*`` bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


class VirtioFeature(enum.IntEnum):
    """Device-independent virtio feature bits (and the vhost-user one)."""

    NOTIFY_ON_EMPTY = 24
    LOG_ALL = 26          # VHOST_F_LOG_ALL: log every write to guest memory (migration)
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VHOST_USER_PROTOCOL_FEATURES = 30
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35


def bit(n: int) -> int:
    return 1 << n


def feature_names(bits: int, *enums: type[enum.IntEnum]) -> list[str]:
    """Names of the set bits, looked up in enums in order; unknown bits as numbers."""
    names = []
    for n in range(64):
        if not bits & (1 << n):
            continue
        for e in enums:
            try:
                names.append(e(n).name)
                break
            except ValueError:
                continue
        else:
            names.append(f"bit{n}")
    return names
