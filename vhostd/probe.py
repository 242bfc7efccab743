"""``vhostd probe``: ask any vhost-user back-end what it offers.

Connects to the back-end's socket as a front-end and only *asks*:
GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS and
GET_CONFIG.  The one thing it sets is SET_PROTOCOL_FEATURES, and only to
the offered subset those questions need (MQ for GET_QUEUE_NUM, CONFIG for
GET_CONFIG, CONFIGURE_MEM_SLOTS for GET_MAX_MEM_SLOTS): no SET_OWNER, no
SET_FEATURES, no memory table, no rings.  Then it disconnects, and the
back-end is left as a front-end that went away leaves it.

The answer is a readable table or (``--json``) a JSON object whose keys
are always present (``null`` when the back-end did not say).
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import stat
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from vhostd.devices.blk import SECTOR_SIZE, BlkFeature
from vhostd.devices.net import NetFeature, format_mac
from vhostd.frontend import Frontend, VhostUserError
from vhostd.protocol.constants import ProtocolFeature, Request, VirtioFeature, bit, feature_names
from vhostd.protocol.messages import U64, Config

DEFAULT_TIMEOUT = 5.0
# GET_CONFIG sizes: the whole struct virtio_blk_config of virtio 1.2 (what
# QEMU asks for; libvhost-user refuses more), and virtio_net_config up to mtu.
BLK_CONFIG_SIZE = 60
NET_CONFIG_SIZE = 12


class ProbeError(Exception):
    """Probing failed; the message is one line naming the failed step."""


class DeviceType(enum.Enum):
    """Names as in vhost-user.rst's back-end conventions (``"type"``)."""

    BLOCK = "block"
    NET = "net"
    UNKNOWN = "unknown"


# --- feature names -------------------------------------------------------
# Spec names of bits the shared enums do not list (so DPDK's offer, say,
# reads as names instead of bitNN).

class _MoreBlkFeature(enum.IntEnum):
    BARRIER = 0
    SCSI = 7
    LIFETIME = 15
    SECURE_ERASE = 16
    ZONED = 17


class _MoreNetFeature(enum.IntEnum):
    GSO = 6
    CTRL_VLAN = 19
    CTRL_RX_EXTRA = 20
    NOTF_COAL = 53
    HASH_REPORT = 57
    RSS = 60
    RSC_EXT = 61
    STANDBY = 62
    SPEED_DUPLEX = 63


class _MoreVirtioFeature(enum.IntEnum):
    LOG_ALL = 26            # VHOST_F_LOG_ALL
    ANY_LAYOUT = 27
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40


class _MoreProtocolFeature(enum.IntEnum):
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


_DEVICE_ENUMS: dict[DeviceType, tuple[type[enum.IntEnum], ...]] = {
    DeviceType.BLOCK: (BlkFeature, _MoreBlkFeature),
    DeviceType.NET: (NetFeature, _MoreNetFeature),
    DeviceType.UNKNOWN: (),
}


def virtio_feature_names(features: int, device_type: DeviceType) -> list[str]:
    """Device-specific bits by the device's names, the others by the generic ones."""
    return feature_names(features, *_DEVICE_ENUMS[device_type], VirtioFeature, _MoreVirtioFeature)


def protocol_feature_names(features: int) -> list[str]:
    return feature_names(features, ProtocolFeature, _MoreProtocolFeature)


# --- which device is it? -------------------------------------------------
# A back-end does not say what it is: vhost-user has no "device id".  The
# device-specific feature bits (0-23) are the only hint, and virtio-blk's
# and virtio-net's overlap almost entirely: bit 5 is net's MAC and blk's RO,
# bit 9 net's GUEST_ECN and blk's FLUSH, bit 12 net's HOST_TSO6 and blk's MQ.
# So no single bit proves a type.  Instead each bit below is a vote for the
# type it is typical of, chosen where the other type leaves the bit
# undefined, deprecated, legacy-only, or dependent on bits it would also set:
#   net: CSUM (blk: legacy BARRIER), MTU, GUEST_TSO6, CTRL_RX..CTRL_MAC_ADDR
#        (undefined for blk), MAC (blk: RO, which read-only disks offer next
#        to several blk votes), GUEST_TSO4 (blk: legacy SCSI), MRG_RXBUF,
#        STATUS, CTRL_VQ (blk: LIFETIME, SECURE_ERASE, ZONED, rarely offered);
#   blk: SEG_MAX (net: CTRL_GUEST_OFFLOADS), GEOMETRY (undefined for net),
#        BLK_SIZE (net: deprecated legacy GSO), FLUSH (net: GUEST_ECN).
# A type needs at least two votes and more than the other type; otherwise
# (e.g. virtio-fs, -scsi, -vsock back-ends, whose few bits mean yet other
# things) the answer is "unknown".

_NET_VOTES = (
    NetFeature.CSUM, NetFeature.MTU, NetFeature.MAC, NetFeature.GUEST_TSO4, NetFeature.GUEST_TSO6,
    NetFeature.MRG_RXBUF, NetFeature.STATUS, NetFeature.CTRL_VQ, NetFeature.CTRL_RX,
    _MoreNetFeature.CTRL_VLAN, _MoreNetFeature.CTRL_RX_EXTRA, NetFeature.GUEST_ANNOUNCE,
    NetFeature.MQ, NetFeature.CTRL_MAC_ADDR,
)
_BLK_VOTES = (BlkFeature.SEG_MAX, BlkFeature.GEOMETRY, BlkFeature.BLK_SIZE, BlkFeature.FLUSH)
_MIN_VOTES = 2


@dataclass(frozen=True)
class TypeGuess:
    device_type: DeviceType
    evidence: tuple[str, ...]     # names of the feature bits that voted for it


def guess_device_type(features: int) -> TypeGuess:
    net = tuple(f.name for f in _NET_VOTES if features & bit(f))
    blk = tuple(f.name for f in _BLK_VOTES if features & bit(f))
    if len(net) >= _MIN_VOTES and len(net) > len(blk):
        return TypeGuess(DeviceType.NET, net)
    if len(blk) >= _MIN_VOTES and len(blk) > len(net):
        return TypeGuess(DeviceType.BLOCK, blk)
    return TypeGuess(DeviceType.UNKNOWN, ())


# --- config space ----------------------------------------------------------

ConfigValue = int | str | None


@dataclass(frozen=True)
class _Field:
    name: str
    offset: int
    fmt: str                  # struct format of the little-endian value
    feature: int | None       # feature bit that makes the field valid (None: always)


_BLK_FIELDS = (                # struct virtio_blk_config, virtio 1.2 section 5.2.4
    _Field("capacity_sectors", 0, "Q", None),
    _Field("size_max", 8, "I", BlkFeature.SIZE_MAX),
    _Field("seg_max", 12, "I", BlkFeature.SEG_MAX),
    _Field("geometry_cylinders", 16, "H", BlkFeature.GEOMETRY),
    _Field("geometry_heads", 18, "B", BlkFeature.GEOMETRY),
    _Field("geometry_sectors", 19, "B", BlkFeature.GEOMETRY),
    _Field("blk_size", 20, "I", BlkFeature.BLK_SIZE),
    _Field("physical_block_exp", 24, "B", BlkFeature.TOPOLOGY),
    _Field("alignment_offset", 25, "B", BlkFeature.TOPOLOGY),
    _Field("min_io_size", 26, "H", BlkFeature.TOPOLOGY),
    _Field("opt_io_size", 28, "I", BlkFeature.TOPOLOGY),
    _Field("writeback", 32, "B", BlkFeature.CONFIG_WCE),
    _Field("num_queues", 34, "H", BlkFeature.MQ),
    _Field("max_discard_sectors", 36, "I", BlkFeature.DISCARD),
    _Field("max_discard_seg", 40, "I", BlkFeature.DISCARD),
    _Field("discard_sector_alignment", 44, "I", BlkFeature.DISCARD),
    _Field("max_write_zeroes_sectors", 48, "I", BlkFeature.WRITE_ZEROES),
    _Field("max_write_zeroes_seg", 52, "I", BlkFeature.WRITE_ZEROES),
    _Field("write_zeroes_may_unmap", 56, "B", BlkFeature.WRITE_ZEROES),
)
_NET_FIELDS = (                # struct virtio_net_config, virtio 1.2 section 5.1.4
    _Field("mac", 0, "6s", NetFeature.MAC),
    _Field("status", 6, "H", NetFeature.STATUS),
    _Field("max_virtqueue_pairs", 8, "H", NetFeature.MQ),
    _Field("mtu", 10, "H", NetFeature.MTU),
)
_FIELDS = {DeviceType.BLOCK: _BLK_FIELDS, DeviceType.NET: _NET_FIELDS}
_CONFIG_SIZE = {DeviceType.BLOCK: BLK_CONFIG_SIZE, DeviceType.NET: NET_CONFIG_SIZE}
VIRTIO_NET_S_LINK_UP, VIRTIO_NET_S_ANNOUNCE = 1, 2


def _read_field(f: _Field, features: int, data: bytes) -> ConfigValue:
    size = struct.calcsize("<" + f.fmt)
    if f.feature is not None and not features & bit(f.feature):
        return None            # the device does not define it
    if f.offset + size > len(data):
        return None            # the back-end's reply was shorter
    (value,) = struct.unpack_from("<" + f.fmt, data, f.offset)
    return format_mac(value) if isinstance(value, bytes) else int(value)


def decode_config(device_type: DeviceType, features: int, data: bytes) -> dict[str, ConfigValue]:
    """Every field of the type's config struct: None where the device does
    not offer the feature that defines it, or the reply did not reach it."""
    fields: dict[str, ConfigValue] = {
        f.name: _read_field(f, features, data) for f in _FIELDS.get(device_type, ())}
    if device_type is DeviceType.BLOCK:
        sectors = fields["capacity_sectors"]
        fields = {"capacity_sectors": sectors,
                  "capacity_bytes": sectors * SECTOR_SIZE if isinstance(sectors, int) else None,
                  **fields}
    return fields


# --- the result ------------------------------------------------------------

@dataclass
class ProbeResult:
    socket: str
    features: int
    guess: TypeGuess
    protocol_features: int | None = None    # None: VHOST_USER_F_PROTOCOL_FEATURES not offered
    queue_num: int | None = None
    max_mem_slots: int | None = None
    config: bytes | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def device_type(self) -> DeviceType:
        return self.guess.device_type

    def has_protocol(self, f: ProtocolFeature) -> bool:
        return self.protocol_features is not None and bool(self.protocol_features & bit(f))

    def ring_layouts(self) -> list[str]:
        """The virtqueue layouts every ring can run: split always (virtio 1.x),
        packed with VIRTIO_F_RING_PACKED."""
        return ["split"] + (["packed"] if self.features & bit(VirtioFeature.RING_PACKED) else [])

    def config_fields(self) -> dict[str, ConfigValue] | None:
        if self.config is None:
            return None
        return decode_config(self.device_type, self.features, self.config)

    def to_json(self) -> dict[str, object]:
        """Stable keys, always all present; feature masks as hex strings."""
        proto = self.protocol_features
        return {
            "socket": self.socket,
            "device_type": self.device_type.value,
            "device_type_evidence": list(self.guess.evidence),
            "features": f"{self.features:#018x}",
            "feature_names": virtio_feature_names(self.features, self.device_type),
            "protocol_features": None if proto is None else f"{proto:#018x}",
            "protocol_feature_names": [] if proto is None else protocol_feature_names(proto),
            "queue_num": self.queue_num,
            "ring_layouts": self.ring_layouts(),
            "max_mem_slots": self.max_mem_slots,
            "config_size": None if self.config is None else len(self.config),
            "config": self.config_fields(),
            "config_raw": None if self.config is None else self.config.hex(),
            "notes": list(self.notes),
        }

    def to_text(self) -> str:
        return _render(_text_rows(self))


# --- text rendering --------------------------------------------------------
# Rows of (key, value): a str value is one line, a list of words is filled
# into as many lines as it needs.  The key column fits the longest key.

Row = tuple[str, str | list[str]]
_LINE_WIDTH = 79
_TYPE_TEXT = {DeviceType.BLOCK: "block (virtio-blk)", DeviceType.NET: "net (virtio-net)",
              DeviceType.UNKNOWN: "unknown"}


def _render(rows: list[Row]) -> str:
    width = max(len(key) for key, _ in rows) + 2
    lines = []
    for key, value in rows:
        values = _fill(value, _LINE_WIDTH - width) if isinstance(value, list) else [value]
        for i, text in enumerate(values or [""]):
            lines.append(f"{key if i == 0 else '':<{width}}{text}".rstrip())
    return "\n".join(lines) + "\n"


def _fill(words: list[str], width: int) -> list[str]:
    lines: list[str] = []
    for word in words:
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _feature_rows(key: str, mask: int, names: list[str]) -> list[Row]:
    return [(key, f"{mask:#018x}"), ("", names)]


def _human_bytes(n: int) -> str:
    value, unit = float(n), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} bytes" if unit == "bytes" else f"{value:.4g} {unit}"


def _config_value_text(name: str, value: int | str, fields: dict[str, ConfigValue]) -> str:
    if name == "capacity_sectors":
        size = fields["capacity_bytes"]
        assert isinstance(size, int)
        human = f", {_human_bytes(size)}" if size >= 1024 else ""
        return f"{value} sectors ({size} bytes{human})"
    if name == "status" and isinstance(value, int):
        flags = [n for b, n in ((VIRTIO_NET_S_LINK_UP, "link up"), (VIRTIO_NET_S_ANNOUNCE, "announce"))
                 if value & b]
        if not value & VIRTIO_NET_S_LINK_UP:
            flags.insert(0, "link down")
        return f"{value:#x} ({', '.join(flags)})"
    if name == "writeback" and isinstance(value, int):
        return f"{value} ({'writeback' if value else 'writethrough'})"
    return str(value)


def _config_rows(r: ProbeResult) -> list[Row]:
    fields = r.config_fields()
    if fields is None or r.config is None:
        return [("config space", "-")]
    rows: list[Row] = [("config space", f"{len(r.config)} bytes (GET_CONFIG)")]
    for name, value in fields.items():
        if value is not None and name != "capacity_bytes":
            rows.append((f"  {name}", _config_value_text(name, value, fields)))
    return rows


def _queue_text(r: ProbeResult) -> str:
    if r.queue_num is None:
        return "-" if r.has_protocol(ProtocolFeature.MQ) else "- (MQ not offered)"
    unit = "queue pairs" if r.device_type is DeviceType.NET else "queues"
    return f"{r.queue_num} {unit} (GET_QUEUE_NUM)"


def _mem_slots_text(r: ProbeResult) -> str:
    if r.max_mem_slots is not None:
        return f"{r.max_mem_slots} (GET_MAX_MEM_SLOTS)"
    return "-" if r.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS) else "- (CONFIGURE_MEM_SLOTS not offered)"


def _text_rows(r: ProbeResult) -> list[Row]:
    rows: list[Row] = [("socket", r.socket), ("device type", _TYPE_TEXT[r.device_type])]
    if r.guess.evidence:
        rows.append(("  guessed from", list(r.guess.evidence)))
    rows += _feature_rows("virtio features", r.features, virtio_feature_names(r.features, r.device_type))
    if r.protocol_features is None:
        rows.append(("protocol features", "- (VHOST_USER_PROTOCOL_FEATURES not offered)"))
    else:
        rows += _feature_rows("protocol features", r.protocol_features,
                              protocol_feature_names(r.protocol_features))
    rows += [("queues", _queue_text(r)), ("ring layouts", " ".join(r.ring_layouts()) + " (each ring)"),
             ("max memory slots", _mem_slots_text(r))]
    rows += _config_rows(r)
    rows += [("note", note) for note in r.notes]
    return rows


# --- talking to the back-end ---------------------------------------------

class _Connection(Frontend):
    """A Frontend whose connect honours the probe's deadline."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise


_BUSY_HINT = " (it may serve only one front-end at a time and be busy)"
# SET_PROTOCOL_FEATURES: what GET_QUEUE_NUM, GET_CONFIG and GET_MAX_MEM_SLOTS need.
_PROTOCOL_WANTED = (bit(ProtocolFeature.MQ) | bit(ProtocolFeature.CONFIG)
                    | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS))


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class _Prober:
    """One probe: the steps in order, each failure named after its step."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.end = time.monotonic() + timeout
        self.conn: _Connection | None = None

    def run(self) -> ProbeResult:
        conn = self._connect()
        try:
            features = self._get_u64(conn, Request.GET_FEATURES, first=True)
            r = ProbeResult(self.path, features, guess_device_type(features))
            if not features & bit(VirtioFeature.VHOST_USER_PROTOCOL_FEATURES):
                r.notes.append("no protocol features: queue count and config space cannot be asked for")
                return r
            r.protocol_features = self._get_u64(conn, Request.GET_PROTOCOL_FEATURES)
            if r.protocol_features & _PROTOCOL_WANTED:
                with self._step(Request.SET_PROTOCOL_FEATURES):
                    conn.send(Request.SET_PROTOCOL_FEATURES,
                              U64(r.protocol_features & _PROTOCOL_WANTED).pack())
            try:
                self._optional_queries(conn, r)
            except ProbeError as e:
                r.notes.append(f"stopped asking: {e}")
            return r
        finally:
            conn.close()

    @contextmanager
    def _step(self, request: Request, first: bool = False) -> Iterator[None]:
        """Runs one request under the deadline; errors become one-line ProbeErrors."""
        name = request.spec_name
        left = self.end - time.monotonic()
        if left <= 0:
            raise ProbeError(f"timeout: {self.timeout:g}s were up before {name}")
        if self.conn is not None:
            self.conn.sock.settimeout(left)
        hint = _BUSY_HINT if first else ""
        try:
            yield
        except TimeoutError:
            raise ProbeError(f"timeout: no answer to {name} within {self.timeout:g}s{hint}") from None
        except ConnectionError:   # closed, reset, broken pipe
            raise ProbeError(f"back-end closed the connection during {name}{hint}") from None
        except (VhostUserError, struct.error, ValueError) as e:
            raise ProbeError(f"{name}: bad reply: {e}") from None
        except OSError as e:
            raise ProbeError(f"{name}: {e.strerror or e}") from None

    def _connect(self) -> _Connection:
        try:
            self.conn = _Connection(self.path, self.timeout)
        except FileNotFoundError:
            raise ProbeError(f"no such socket: {self.path}") from None
        except ConnectionRefusedError:
            if not _is_socket(self.path):
                raise ProbeError(f"not a socket: {self.path}") from None
            raise ProbeError(f"connection refused: nothing listens on {self.path}") from None
        except TimeoutError:
            raise ProbeError(f"timeout: connecting to {self.path} took over {self.timeout:g}s"
                             f"{_BUSY_HINT}") from None
        except OSError as e:
            what = "not a socket" if e.errno == errno.ENOTSOCK else e.strerror or str(e)
            raise ProbeError(f"cannot connect to {self.path}: {what}") from None
        return self.conn

    def _get_u64(self, conn: _Connection, request: Request, first: bool = False) -> int:
        with self._step(request, first):
            return conn.get_u64(request)

    def _read_config(self, conn: _Connection, size: int) -> bytes | None:
        """GET_CONFIG of size bytes; None when the back-end refuses (empty reply)."""
        with self._step(Request.GET_CONFIG):
            reply = conn.call(Request.GET_CONFIG, Config(0, size, 0, bytes(size)).pack())
            if not reply:
                return None        # libvhost-user's way of saying no
            return Config.unpack(reply).data

    def _optional_queries(self, conn: _Connection, r: ProbeResult) -> None:
        """Queue count, memory slots, config: each only when its protocol
        feature is offered.  These can fail on a back-end that offers more
        than it serves (DPDK drops the connection on GET_CONFIG unless it is
        a vDPA device): the caller turns that into a note, nothing is asked
        after it."""
        if r.has_protocol(ProtocolFeature.MQ):
            r.queue_num = self._get_u64(conn, Request.GET_QUEUE_NUM)
        if r.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            r.max_mem_slots = self._get_u64(conn, Request.GET_MAX_MEM_SLOTS)
        if not r.has_protocol(ProtocolFeature.CONFIG):
            r.notes.append("config space not read: the back-end does not offer CONFIG")
        elif r.device_type is DeviceType.UNKNOWN:
            r.notes.append("config space not read: its layout depends on the unknown device type")
        else:
            r.config = self._read_config(conn, _CONFIG_SIZE[r.device_type])
            if r.config is None:
                r.notes.append("GET_CONFIG: the back-end refused (empty reply)")


def probe(path: str, timeout: float = DEFAULT_TIMEOUT) -> ProbeResult:
    """Asks the back-end at path what it offers (within timeout seconds in
    all); raises ProbeError with a one-line message."""
    return _Prober(path, timeout).run()
