"""Linux tap devices for virtio-net: one queue fd per queue pair.

Kernel facts this relies on (drivers/net/tun.c):
- TUNSETIFF on /dev/net/tun with an existing name attaches to that device;
  with a new name it creates one that vanishes when its last fd closes
  (unless made persistent).  So a tap vhostd creates is removed on exit by
  closing the fds, and one it attached to is left as it was.
- IFF_MULTI_QUEUE must match how a persistent tap was created.
- With IFF_VNET_HDR every read/write carries a virtio_net_hdr of
  TUNSETVNETHDRSZ bytes (10 or 12), exactly the guest's header.  The tap
  writes only the first 10 bytes on read: num_buffers is ours to set.
- The tap's flags (IFF_VNET_HDR among them) are the device's, and only
  the first queue attached sets them: changing them means closing every
  queue and attaching again, with IFF_PERSIST held meanwhile so the
  device (its MTU, bridge port, link state) survives.
- TUNSETOFFLOAD says which offloaded frames (partial checksum, TSO, UFO)
  the tap may hand us on read, i.e. what the guest accepts (GUEST_*).
  What the tap accepts on write is not limited by it.
Netlink work (MTU, bridge, link state) goes through pyroute2.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from vhostd.fds import OwnedFd, close_all

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
TUNSETPERSIST = 0x400454CB
TUNGETIFF = 0x800454D2
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_PERSIST = 0x0800
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
IFNAMSIZ = 16


class TapError(Exception):
    pass


@dataclass(frozen=True)
class TapOptions:
    name: str
    queue_pairs: int = 1
    mtu: int | None = None
    bridge: str | None = None

    def __post_init__(self) -> None:
        if not 0 < len(self.name.encode()) < IFNAMSIZ:
            raise ValueError(f"tap: name {self.name!r} must be 1..{IFNAMSIZ - 1} bytes")


def _exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _tun_flags(fd: OwnedFd) -> int:
    """The device's flags, IFF_PERSIST and IFF_VNET_HDR among them (TUNGETIFF)."""
    ifr = fcntl.ioctl(fd.fileno(), TUNGETIFF, bytes(40))
    return int(struct.unpack_from("H", ifr, 16)[0])


def _open_queue(name: str, multi_queue: bool, vnet_hdr: bool = True) -> OwnedFd:
    fd = OwnedFd(os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
    flags = (IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
             | (IFF_MULTI_QUEUE if multi_queue else 0))
    try:
        fcntl.ioctl(fd.fileno(), TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError:
        fd.close()
        raise
    return fd


class Tap:
    def __init__(self, options: TapOptions) -> None:
        self.options = options
        self.name = options.name
        self.created = not _exists(self.name)
        self.queues: list[OwnedFd] = []
        self.multi_queue = True
        self.vnet_hdr = True   # reads and writes carry a virtio_net_hdr
        try:
            self._open_queues()
            self._configure_link()
        except BaseException:
            self.close()
            raise

    def _open_queues(self) -> None:
        for i in range(self.options.queue_pairs):
            try:
                self.queues.append(_open_queue(self.name, multi_queue=True))
            except OSError as e:
                # A persistent single-queue tap refuses IFF_MULTI_QUEUE.
                if e.errno == errno.EINVAL and not self.created and self.options.queue_pairs == 1:
                    self.multi_queue = False
                    self.queues.append(_open_queue(self.name, multi_queue=False))
                    continue
                raise TapError(f"tap {self.name}: cannot open queue {i}: {e.strerror}"
                               + (" (single-queue tap: use 1 queue pair)" if e.errno == errno.EINVAL else "")
                               ) from None

    def _configure_link(self) -> None:
        with IPRoute() as ipr:
            idx = self.ifindex(ipr)
            if self.options.mtu is not None:
                ipr.link("set", index=idx, mtu=self.options.mtu)
            if self.options.bridge is not None:
                found = ipr.link_lookup(ifname=self.options.bridge)
                if not found:
                    raise TapError(f"tap {self.name}: bridge {self.options.bridge} does not exist")
                ipr.link("set", index=idx, master=found[0])
            ipr.link("set", index=idx, state="up")

    def ifindex(self, ipr: IPRoute) -> int:
        found = ipr.link_lookup(ifname=self.name)
        if not found:
            raise TapError(f"tap {self.name} disappeared")
        return int(found[0])

    def set_mtu(self, mtu: int) -> None:
        with IPRoute() as ipr:
            ipr.link("set", index=self.ifindex(ipr), mtu=mtu)

    def mtu(self) -> int:
        return int(Path("/sys/class/net", self.name, "mtu").read_text())

    def is_up(self) -> bool:
        try:
            flags = int(Path("/sys/class/net", self.name, "flags").read_text(), 16)
        except FileNotFoundError:
            return False
        return bool(flags & 0x1)   # IFF_UP

    def set_vnet_hdr_size(self, size: int) -> None:
        for q in self.queues:
            fcntl.ioctl(q.fileno(), TUNSETVNETHDRSZ, struct.pack("i", size))

    def set_vnet_hdr(self, enabled: bool) -> bool:
        """Reattaches every queue with or without IFF_VNET_HDR, keeping the
        fd numbers (the data plane holds them).  Only while no worker runs.
        A tap someone else also holds keeps its flags.  Returns whether the
        queues now carry the header (read back from the kernel)."""
        if enabled == self.vnet_hdr:
            return enabled
        persistent = bool(_tun_flags(self.queues[0]) & IFF_PERSIST)
        if not (self.created or persistent):
            return self.vnet_hdr
        try:
            if not persistent:
                fcntl.ioctl(self.queues[0].fileno(), TUNSETPERSIST, 1)
            self._reattach(enabled)
            if not persistent:
                fcntl.ioctl(self.queues[0].fileno(), TUNSETPERSIST, 0)
        except OSError as e:
            if not persistent:
                self._unpersist()
            raise TapError(f"tap {self.name}: cannot reattach queues "
                           f"{'with' if enabled else 'without'} IFF_VNET_HDR: {e.strerror}") from None
        self.vnet_hdr = bool(_tun_flags(self.queues[0]) & IFF_VNET_HDR)
        return self.vnet_hdr

    def _unpersist(self) -> None:
        """After a failed reattach: a tap vhostd created must not outlive it."""
        try:
            fd = _open_queue(self.name, self.multi_queue, self.vnet_hdr)
        except OSError:
            return
        try:
            fcntl.ioctl(fd.fileno(), TUNSETPERSIST, 0)
        except OSError:
            pass
        finally:
            fd.close()

    def _reattach(self, vnet_hdr: bool) -> None:
        # Every queue is detached first (its fd number held by /dev/null,
        # so nothing else can take it); the first new one sets the flags.
        placeholder = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for q in self.queues:
                os.dup2(placeholder, q.fileno(), inheritable=False)
        finally:
            os.close(placeholder)
        for q in self.queues:
            fresh = _open_queue(self.name, self.multi_queue, vnet_hdr)
            try:
                os.dup2(fresh.fileno(), q.fileno(), inheritable=False)
            finally:
                fresh.close()

    def set_offload(self, flags: int) -> int:
        """Applies the offloads; drops UFO if this kernel refuses it.  Returns what was set."""
        for attempt in (flags, flags & ~TUN_F_UFO):
            try:
                for q in self.queues:
                    fcntl.ioctl(q.fileno(), TUNSETOFFLOAD, attempt)
                return attempt
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        raise TapError(f"tap {self.name}: offloads {flags:#x} refused")

    def set_active_queues(self, n: int) -> None:
        """Detaches the queues of inactive pairs, so the kernel stops steering
        frames to queues the guest no longer reads (MQ via the control queue)."""
        if len(self.queues) < 2:
            return
        for i, q in enumerate(self.queues):
            flags = IFF_ATTACH_QUEUE if i < n else IFF_DETACH_QUEUE
            try:
                fcntl.ioctl(q.fileno(), TUNSETQUEUE, struct.pack("16sH22x", b"", flags))
            except OSError as e:
                if e.errno != errno.EINVAL:   # already in that state
                    raise TapError(f"tap {self.name}: queue {i}: {e.strerror}") from None

    def write_frame(self, frame: bytes, hdr_len: int) -> None:
        """Control-plane frames (RARP after migration), with an empty header."""
        os.write(self.queues[0].fileno(), bytes(hdr_len) + frame)

    def close(self) -> None:
        close_all(self.queues)
        self.queues = []
