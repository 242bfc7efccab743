"""virtio-net (virtio 1.2 section 5.1) over a tap device.

The guest's queue pair i is rings 2i (receiveq) and 2i+1 (transmitq) and
tap queue fd i.  Feature negotiation decides the header size and which
offloads the tap may hand the guest; the C data plane does the rest.
The control virtqueue stays with the front-end (QEMU and DPDK's
virtio-user both emulate it and translate MQ changes to SET_VRING_ENABLE),
so CTRL_VQ is not offered.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import re
import struct
from dataclasses import asdict, dataclass
from typing import Any

from vhostd.backends.tap import (
    TapError,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    Tap,
    TapOptions,
)
from vhostd.devices.base import (
    COMMON_FEATURES,
    COMMON_PROTOCOL_FEATURES,
    Device,
    DeviceError,
    DeviceType,
    QueueBackend,
    WorkerOptions,
)
from vhostd.native import QOS_READ, QOS_WRITE, NativeNet, NativeNetCtrl, lib
from vhostd.protocol.constants import ProtocolFeature, VirtioFeature, bit

MAX_QUEUE_PAIRS = 8
log = logging.getLogger("vhostd")
MIN_MTU, MAX_MTU = 68, 65535


class NetFeature(enum.IntEnum):
    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23


# MQ requires CTRL_VQ (virtio 1.2 5.1.3.1).  QEMU and DPDK's virtio-user keep
# the control queue for themselves; another front-end may hand it over.
# GUEST_ANNOUNCE: after a migration QEMU 7.2 itself sets the announce bit in
# its config space and takes the guest's ack on the control queue
# (virtio_net_post_load_device), and the guest sends gratuitous ARPs with
# its real addresses; QEMU then skips VHOST_USER_SEND_RARP.  Guests without
# it still get the RARP.
OFFERED = (
    NetFeature.CSUM, NetFeature.GUEST_CSUM, NetFeature.MAC, NetFeature.MTU,
    NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6, NetFeature.GUEST_ECN, NetFeature.GUEST_UFO,
    NetFeature.HOST_TSO4, NetFeature.HOST_TSO6, NetFeature.HOST_ECN, NetFeature.HOST_UFO,
    NetFeature.MRG_RXBUF, NetFeature.STATUS, NetFeature.CTRL_VQ, NetFeature.CTRL_RX,
    NetFeature.GUEST_ANNOUNCE, NetFeature.MQ, NetFeature.CTRL_MAC_ADDR,
)
# GUEST_* feature -> tap offload it allows on the receive path.
RX_OFFLOADS = {
    NetFeature.GUEST_CSUM: TUN_F_CSUM,
    NetFeature.GUEST_TSO4: TUN_F_TSO4,
    NetFeature.GUEST_TSO6: TUN_F_TSO6,
    NetFeature.GUEST_ECN: TUN_F_TSO_ECN,
    NetFeature.GUEST_UFO: TUN_F_UFO,
}
# HOST_* feature -> header fields a guest frame may use on the transmit path.
TX_OFFLOADS = {
    NetFeature.CSUM: lib.VHD_NET_GSO_CSUM,
    NetFeature.HOST_TSO4: lib.VHD_NET_GSO_TCPV4,
    NetFeature.HOST_TSO6: lib.VHD_NET_GSO_TCPV6,
    NetFeature.HOST_ECN: lib.VHD_NET_GSO_ECN,
    NetFeature.HOST_UFO: lib.VHD_NET_GSO_UDP,
}
VIRTIO_NET_S_LINK_UP = 1


def parse_mac(text: str) -> bytes:
    if not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", text):
        raise ValueError(f"mac: {text!r} is not of the form 52:54:00:12:34:56")
    mac = bytes(int(x, 16) for x in text.split(":"))
    if mac[0] & 1:
        raise ValueError(f"mac: {text} is a multicast address")
    return mac


def default_mac(tap: str) -> bytes:
    """Stable per tap name, locally administered, unicast."""
    h = hashlib.sha256(f"vhostd:{tap}".encode()).digest()
    return bytes([0x02]) + h[:5]


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass(frozen=True)
class NetOptions:
    """tap None is the null back-end: TX discarded, RX generated (benchmarks, tests)."""

    tap: str | None
    queue_pairs: int = 1
    mtu: int | None = None
    mac: bytes | None = None
    bridge: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queue_pairs: {self.queue_pairs} is not in 1..{MAX_QUEUE_PAIRS}")
        if self.mtu is not None and not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"mtu: {self.mtu} is not in {MIN_MTU}..{MAX_MTU}")


class NetDevice(Device):
    device_type = DeviceType.NET
    feature_enum = NetFeature

    def __init__(self, name: str, options: NetOptions, workers: WorkerOptions = WorkerOptions()) -> None:
        super().__init__(name, workers)
        self.options = options
        self.mac = options.mac or default_mac(options.tap or name)
        self.tap: Tap | None = None
        if options.tap is not None:
            self.tap = Tap(TapOptions(options.tap, options.queue_pairs, options.mtu, options.bridge))
            self.pairs = [NativeNet(q.fileno()) for q in self.tap.queues]
        else:
            self.pairs = [NativeNet(-1) for _ in range(options.queue_pairs)]
            frame = b"\xff" * 6 + self.mac + b"\x88\xb5"
            for p in self.pairs:
                p.set_null_frame(frame.ljust(60, b"\0"))
        self.hdr_len = 12
        self.negotiated = 0
        self.ctrl = NativeNetCtrl(options.queue_pairs)
        self._ctrl_generation = 0

    @property
    def num_queues(self) -> int:
        return 2 * self.options.queue_pairs + 1   # + the control queue

    def ctrl_index(self) -> int:
        """The control queue follows the last queue pair (pair 0 without MQ)."""
        return 2 * self.options.queue_pairs if self.negotiated & bit(NetFeature.MQ) else 2

    @property
    def queue_num(self) -> int:
        return self.options.queue_pairs

    def features(self) -> int:
        f = COMMON_FEATURES
        for b in OFFERED:
            f |= bit(b)
        return f

    def protocol_features(self) -> int:
        return COMMON_PROTOCOL_FEATURES | bit(ProtocolFeature.RARP) | bit(ProtocolFeature.NET_MTU)

    def config(self) -> bytes:
        """struct virtio_net_config: mac, status, max_virtqueue_pairs, mtu."""
        status = VIRTIO_NET_S_LINK_UP if self.tap is None or self.tap.is_up() else 0
        mtu = self.tap.mtu() if self.tap else (self.options.mtu or 1500)
        return struct.pack("<6sHHH", self.mac, status, self.options.queue_pairs, mtu)

    def on_features(self, features: int) -> None:
        def has(f: int) -> bool:
            return bool(features & bit(f))

        self.negotiated = features
        mrg = has(NetFeature.MRG_RXBUF)
        self.hdr_len = 12 if has(VirtioFeature.VERSION_1) or mrg else 10
        tx_gso = 0
        for feature, flag in TX_OFFLOADS.items():
            if has(feature):
                tx_gso |= flag
        rx_offload = 0
        for feature, flag in RX_OFFLOADS.items():
            if has(feature):
                rx_offload |= flag
        if not rx_offload & TUN_F_CSUM:
            rx_offload = 0   # the kernel needs partial checksums for any segmentation offload
        backend_hdr = True
        if self.tap is not None:
            try:
                # No offload either way: the tap's header would carry nothing
                # and costs the kernel ~0.2 us per frame (bench/README.md).
                had_hdr = self.tap.vnet_hdr
                backend_hdr = self.tap.set_vnet_hdr(bool(rx_offload or tx_gso))
                if backend_hdr != had_hdr:
                    log.info("%s: tap %s reattached %s the virtio-net header (offloads %s)", self.name,
                             self.tap.name, "with" if backend_hdr else "without", "on" if backend_hdr else "off")
                if backend_hdr:
                    self.tap.set_vnet_hdr_size(self.hdr_len)
                self.tap.set_offload(rx_offload)
                if self._ctrl_generation:   # reattaching attached every queue
                    self.tap.set_active_queues(self.ctrl.state().active_pairs)
            except TapError as e:
                raise DeviceError(str(e)) from None
            except OSError as e:
                raise DeviceError(f"tap {self.tap.name}: {e}") from None
        for pair in self.pairs:
            pair.configure(self.hdr_len, mrg, tx_gso, backend_hdr)

    def status(self) -> dict[str, Any]:
        return {
            "backend": "tap" if self.tap else "null",
            "tap": self.tap.name if self.tap else None,
            "link_up": self.tap.is_up() if self.tap else True,
            "tap_vnet_hdr": self.tap.vnet_hdr if self.tap else None,
            "mac": format_mac(self.mac),
            "queue_pairs": [asdict(p.stats()) for p in self.pairs],
            "ctrl": asdict(self.ctrl.state()) | {"mac": None},
        }

    def on_event(self) -> None:
        st = self.ctrl.state()
        if st.generation != self._ctrl_generation and self.tap is not None:
            self._ctrl_generation = st.generation
            try:
                self.tap.set_active_queues(st.active_pairs)
            except TapError as e:
                log.warning("%s: %s", self.name, e)
            log.info("%s: guest set %d active queue pair(s)", self.name, st.active_pairs)

    def on_disconnect(self) -> None:
        if self.tap is not None and self._ctrl_generation:
            self.tap.set_active_queues(len(self.pairs))   # the next guest starts with all
        self._ctrl_generation = 0

    def queue_backend(self, index: int) -> QueueBackend:
        if self.negotiated & bit(NetFeature.CTRL_VQ) and index == self.ctrl_index():
            return QueueBackend(NativeNetCtrl.kind, self.ctrl.ptr)
        if index >= 2 * len(self.pairs):
            raise DeviceError(f"ring {index} is not a queue of this device")
        pair = self.pairs[index // 2]
        if index % 2 == 0:   # QoS: RX moves frames into the guest (read), TX out of it (write)
            return QueueBackend(NativeNet.RX, pair.ptr, pair.backend_fd, qos_classes=QOS_READ)
        return QueueBackend(NativeNet.TX, pair.ptr, qos_classes=QOS_WRITE)

    def set_mtu(self, mtu: int) -> None:
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise DeviceError(f"MTU {mtu} is not in {MIN_MTU}..{MAX_MTU}")
        if self.tap is None:
            return
        try:
            self.tap.set_mtu(mtu)
        except Exception as e:
            raise DeviceError(f"tap {self.tap.name}: cannot set MTU {mtu}: {e}") from None

    def send_rarp(self, mac: bytes) -> None:
        # RARP request announcing mac (what QEMU's own announce sends).
        frame = (b"\xff" * 6 + mac + b"\x80\x35"
                 + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 3)
                 + mac + bytes(4) + mac + bytes(4)).ljust(60, b"\0")
        if self.tap is None:
            return
        try:
            self.tap.write_frame(frame, self.hdr_len if self.tap.vnet_hdr else 0)
        except OSError as e:
            raise DeviceError(f"tap {self.tap.name}: cannot send RARP: {e.strerror}") from None

    def close(self) -> None:
        for pair in self.pairs:
            pair.close()
        self.ctrl.close()
        if self.tap is not None:
            self.tap.close()
        self.qos.close()
