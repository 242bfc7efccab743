"""The small interface between the vhost-user protocol layer and a device.

The session (protocol) owns rings, memory and negotiation; a device says
what it offers (features, queues, config space) and hands out the native
back-end each ring's worker calls into.
"""

from __future__ import annotations

import abc
import enum
from typing import Any

from vhostd.protocol.constants import ProtocolFeature, VirtioFeature, bit, feature_names
from vhostd.qos import DeviceQos
from vhostd.vring import QueueBackend, WorkerOptions

__all__ = ["Device", "DeviceError", "DeviceType", "QueueBackend", "WorkerOptions"]


class DeviceType(enum.Enum):
    """Names as in vhost-user.rst's back-end program conventions."""

    BLOCK = "block"
    NET = "net"


class DeviceError(Exception):
    """A request the device refuses without the connection being at fault."""


# Offered by every vhostd device.
COMMON_FEATURES = (
    bit(VirtioFeature.VERSION_1)
    | bit(VirtioFeature.RING_INDIRECT_DESC)
    | bit(VirtioFeature.RING_EVENT_IDX)
    | bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES)
    | bit(VirtioFeature.LOG_ALL)
    | bit(VirtioFeature.RING_PACKED)
)
# Offered by every device; each adds only what it uses (QEMU warns on every
# start about a protocol feature its device type has no use for, e.g. CONFIG
# on net: QEMU's virtio-net reads no config space from the back-end).
# LOG_SHMFD with LOG_ALL: live migration (the dirty log is shared memory).
# CONFIGURE_MEM_SLOTS: memory hotplug past 8 regions (ADD/REM_MEM_REG).
COMMON_PROTOCOL_FEATURES = (
    bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.LOG_SHMFD)
    | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
)


class Device(abc.ABC):
    device_type: DeviceType

    def __init__(self, name: str, workers: WorkerOptions = WorkerOptions()) -> None:
        self.name = name
        self.workers = workers
        # QoS limits (vhostd/qos.py): unlimited until the daemon sets some.
        self.qos = DeviceQos(name, "blk" if self.device_type is DeviceType.BLOCK else "net")

    @property
    @abc.abstractmethod
    def num_queues(self) -> int: ...

    @abc.abstractmethod
    def features(self) -> int:
        """virtio feature bits offered (GET_FEATURES)."""

    def protocol_features(self) -> int:
        return COMMON_PROTOCOL_FEATURES

    @abc.abstractmethod
    def config(self) -> bytes:
        """The device's virtio config space."""

    def read_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG: bytes outside the config space read as zero."""
        data = self.config()[offset: offset + size]
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        raise DeviceError(f"config space is read-only (write of {len(data)} bytes at {offset})")

    @property
    def queue_num(self) -> int:
        """GET_QUEUE_NUM's answer (net devices count queue pairs)."""
        return self.num_queues

    @abc.abstractmethod
    def queue_backend(self, index: int) -> QueueBackend:
        """What the native worker of ring ``index`` runs."""

    def set_mtu(self, mtu: int) -> None:
        """VHOST_USER_NET_SET_MTU."""
        raise DeviceError("MTU is not a property of this device")

    def send_rarp(self, mac: bytes) -> None:
        """VHOST_USER_SEND_RARP: announce mac after migration."""
        raise DeviceError("RARP is not supported by this device")

    # Device-specific feature bits, for names in logs and status.
    feature_enum: type[enum.IntEnum] = VirtioFeature

    def feature_names(self, bits: int) -> list[str]:
        return feature_names(bits, self.feature_enum, VirtioFeature)

    def status(self) -> dict[str, Any]:
        """Device-specific facts and counters for `vhostd status`."""
        return {}

    def on_features(self, features: int) -> None:
        """The front-end acknowledged these features (SET_FEATURES)."""

    def on_event(self) -> None:
        """A worker signalled the daemon (e.g. the guest changed its active
        queue pairs through the control queue); apply what needs applying."""

    def on_disconnect(self) -> None:
        """The front-end went away; forget per-connection state."""

    def close(self) -> None:
        """Release back-end resources (the daemon is done with the device)."""
