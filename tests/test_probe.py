"""`vhostd probe` against real back-ends (vhostd blk and net,
qemu-storage-daemon's vhost-user-blk export, DPDK's net_vhost in
dpdk-testpmd) and scripted fake ones for the error paths and for what
exactly probe sends.

qemu-storage-daemon and dpdk-testpmd tests skip when the binary is
missing, and fail instead when $CI is set.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vhostd_proc  # noqa: E402
from vhostd.cli import main  # noqa: E402
from vhostd.devices import blk as blk_dev  # noqa: E402
from vhostd.frontend import BlkDriver, DriverRing, Frontend, GuestRam  # noqa: E402
from vhostd.probe import DeviceType, ProbeError, guess_device_type, probe  # noqa: E402
from vhostd.protocol.constants import HEADER_SIZE, ProtocolFeature, Request, bit  # noqa: E402
from vhostd.protocol.messages import U64, Config, Header, encode_reply  # noqa: E402
from unavailable import missing  # noqa: E402

pytestmark = pytest.mark.usefixtures("watchdog")

VHOSTD = [sys.executable, "-m", "vhostd"]
MIB = 1 << 20


def run_probe(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command line, as a user runs it."""
    return subprocess.run([*VHOSTD, "probe", *args, str(sock)], capture_output=True, text=True,
                          timeout=30)


def probe_json(sock: Path) -> dict[str, Any]:
    p = run_probe(sock, "--json")
    assert p.returncode == 0, p.stderr
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def probe_text(sock: Path) -> str:
    p = run_probe(sock)
    assert p.returncode == 0, p.stderr
    return p.stdout


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} not installed (apt-get install {package})")
    return path


def row(text: str, key: str) -> str:
    """The value of the text table's row named key (its first line)."""
    m = re.search(rf"^{re.escape(key)}  +(\S.*)$", text, re.M)
    assert m, f"no row {key!r} in:\n{text}"
    return m[1]


JSON_KEYS = {"socket", "device_type", "device_type_evidence", "features", "feature_names",
             "protocol_features", "protocol_feature_names", "queue_num", "ring_layouts", "max_mem_slots",
             "config_size", "config", "config_raw", "notes"}


# --- vhostd ------------------------------------------------------------------

def _blk_roundtrip(sock: Path) -> None:
    """A full front-end session still works after probing."""
    fe = Frontend(str(sock))
    try:
        fe.negotiate(~0, bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK))
        ram = GuestRam([2 * MIB])
        fe.set_mem_table(ram)
        ring = DriverRing(ram, 0, 32)
        fe.start_ring(ring)
        drv = BlkDriver(ring)
        assert drv.write(3, b"\x5a" * 512).status == 0
        assert drv.read(3, 512).data == b"\x5a" * 512
    finally:
        fe.close()


def test_vhostd_blk(tmp_path: Path) -> None:
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", 64 * MIB)
    with vhostd_proc.blk(tmp_path, image, "--num-queues", "2") as d:
        assert d.socket is not None
        j = probe_json(d.socket)
        assert set(j) == JSON_KEYS
        assert j["device_type"] == "block"
        assert {"FLUSH", "SEG_MAX", "BLK_SIZE", "MQ", "VERSION_1",
                "VHOST_USER_PROTOCOL_FEATURES"} <= set(j["feature_names"])
        assert "RO" not in j["feature_names"]
        assert {"MQ", "CONFIG", "INFLIGHT_SHMFD", "LOG_SHMFD"} <= set(j["protocol_feature_names"])
        assert "LOG_ALL" in j["feature_names"]
        assert j["queue_num"] == 2
        assert j["max_mem_slots"] == 509 and "CONFIGURE_MEM_SLOTS" in j["protocol_feature_names"]
        c = j["config"]
        assert c["capacity_sectors"] == 64 * MIB // 512
        assert c["capacity_bytes"] == 64 * MIB
        assert c["num_queues"] == 2
        assert c["seg_max"] == blk_dev.SEG_MAX and c["size_max"] == blk_dev.SIZE_MAX
        assert c["blk_size"] == 512
        assert c["geometry_cylinders"] is None       # GEOMETRY not offered
        assert j["notes"] == []

        text = probe_text(d.socket)
        assert row(text, "device type") == "block (virtio-blk)"
        assert row(text, "  guessed from") == "SEG_MAX BLK_SIZE FLUSH"
        assert row(text, "  capacity_sectors") == "131072 sectors (67108864 bytes, 64 MiB)"
        assert row(text, "queues") == "2 queues (GET_QUEUE_NUM)"
        assert "INFLIGHT_SHMFD" in text
        assert "RING_PACKED" in j["feature_names"] and j["ring_layouts"] == ["split", "packed"]
        assert row(text, "ring layouts") == "split packed (each ring)"

        _blk_roundtrip(d.socket)
        assert d.alive()
        assert "WARNING" not in d.log() and "ERROR" not in d.log()
        assert "SET_MEM_TABLE" not in d.log().split("front-end disconnected")[0]


def test_vhostd_blk_read_only(tmp_path: Path) -> None:
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", 8 * MIB)
    with vhostd_proc.blk(tmp_path, image, "--read-only") as d:
        assert d.socket is not None
        j = probe_json(d.socket)
    assert j["device_type"] == "block"          # RO is net's MAC bit: still blk
    assert "RO" in j["feature_names"] and j["queue_num"] == 1


def test_vhostd_net_null(tmp_path: Path) -> None:
    sock = tmp_path / "net0.sock"
    args = ["net", "--backend", "null", "--queue-pairs", "2", "--mac", "52:54:00:12:34:56",
            "--socket-path", str(sock)]
    with vhostd_proc.Vhostd(args, sock, tmp_path / "net0.log") as d:
        j = probe_json(sock)
        text = probe_text(sock)
        assert d.alive()
    assert j["device_type"] == "net"
    assert {"MAC", "MRG_RXBUF", "STATUS", "MQ", "MTU", "LOG_ALL"} <= set(j["feature_names"])
    assert {"MQ", "RARP", "NET_MTU", "LOG_SHMFD"} <= set(j["protocol_feature_names"])
    # QEMU's virtio-net reads no config space from a back-end and warns on
    # every start about CONFIG offered: net does not offer it.
    assert "CONFIG" not in j["protocol_feature_names"]
    assert j["config"] is None
    assert j["notes"] == ["config space not read: the back-end does not offer CONFIG"]
    assert j["queue_num"] == 2
    assert row(text, "device type") == "net (virtio-net)"
    assert row(text, "queues") == "2 queue pairs (GET_QUEUE_NUM)"
    assert "RING_PACKED" in j["feature_names"] and j["ring_layouts"] == ["split", "packed"]


def test_busy_vhostd_is_named(tmp_path: Path) -> None:
    """vhostd serves one front-end at a time and closes a second one."""
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", MIB)
    with vhostd_proc.blk(tmp_path, image) as d:
        assert d.socket is not None
        fe = Frontend(str(d.socket))
        try:
            fe.get_u64(Request.GET_FEATURES)     # the session is established
            p = run_probe(d.socket)
        finally:
            fe.close()
    assert p.returncode == 1
    assert p.stderr == ("Error: back-end closed the connection during VHOST_USER_GET_FEATURES "
                        "(it may serve only one front-end at a time and be busy)\n")


# --- qemu-storage-daemon -------------------------------------------------------

@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[Callable[[Path, int], Path]]:
    binary = require_binary("qemu-storage-daemon", "qemu-system-common")
    procs: list[subprocess.Popen[bytes]] = []

    def start(image: Path, num_queues: int) -> Path:
        sock = tmp_path / "qsd.sock"
        log = open(tmp_path / "qsd.log", "wb")
        p = subprocess.Popen(
            [binary, "--blockdev", f"driver=file,node-name=f,filename={image}",
             "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
                         f"writable=on,num-queues={num_queues}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent)
        log.close()
        procs.append(p)
        _wait_socket(sock, p, tmp_path / "qsd.log")
        return sock

    yield start
    for p in procs:
        _stop(p)


def test_qemu_storage_daemon(qsd: Callable[[Path, int], Path], tmp_path: Path) -> None:
    size = 100 * MIB + 4096          # not a power of two
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", size)
    sock = qsd(image, 3)
    j = probe_json(sock)
    assert j["device_type"] == "block"
    assert {"FLUSH", "SEG_MAX", "BLK_SIZE", "MQ", "DISCARD", "WRITE_ZEROES"} <= set(j["feature_names"])
    assert {"MQ", "CONFIG", "CONFIGURE_MEM_SLOTS"} <= set(j["protocol_feature_names"])
    assert j["config"]["capacity_bytes"] == size
    assert j["config"]["capacity_sectors"] == size // 512
    assert j["config"]["num_queues"] == 3
    assert j["queue_num"] == 3
    assert isinstance(j["max_mem_slots"], int) and j["max_mem_slots"] >= 8
    assert j["config"]["max_discard_sectors"] is not None
    # It is still listening and serves the next front-end the same.
    assert probe_json(sock) == j
    assert row(probe_text(sock), "  writeback") in ("0 (writethrough)", "1 (writeback)")


# --- DPDK net_vhost ---------------------------------------------------------------

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """A busy-polling testpmd must not outlive a killed pytest."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _wait_socket(sock: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no socket {sock}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)


def _stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_dpdk_net_vhost(tmp_path: Path) -> None:
    binary = require_binary("dpdk-testpmd", "dpdk")
    sock = tmp_path / "dpdk.sock"
    prefix = f"vhd-probe-{os.getpid()}"
    log_path = tmp_path / "testpmd.out"
    # Pinned: main lcore 0 and forwarding lcore 1 both on CPU 1; it
    # busy-polls until SIGINT, so the run is bounded by this test.
    cmd = [binary, "--no-pci", f"--file-prefix={prefix}", "--lcores=(0,1)@1", "--no-huge",
           "-m", "256", "--vdev", f"net_vhost0,iface={sock},queues=2",
           "--", "--total-num-mbufs=16384", "--auto-start", "--stats-period", "1"]
    with open(log_path, "wb") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             preexec_fn=_die_with_parent)
    try:
        _wait_socket(sock, p, log_path)
        j = probe_json(sock)
        again = probe_json(sock)          # it accepts the next front-end
        assert p.poll() is None, log_path.read_text(errors="replace")[-3000:]
    finally:
        _stop(p, signal.SIGINT)
        shutil.rmtree(f"/var/run/dpdk/{prefix}", ignore_errors=True)
    assert j == again
    assert j["device_type"] == "net"
    assert {"MRG_RXBUF", "CTRL_VQ", "MQ", "VERSION_1", "LOG_ALL"} <= set(j["feature_names"])
    assert {"MQ", "REPLY_ACK"} <= set(j["protocol_feature_names"])
    assert "CONFIG" not in j["protocol_feature_names"]
    # DPDK answers GET_QUEUE_NUM with its maximum of queue pairs, not queues=.
    assert isinstance(j["queue_num"], int) and j["queue_num"] >= 2
    assert j["config"] is None
    assert j["notes"] == ["config space not read: the back-end does not offer CONFIG"]
    out = log_path.read_text(errors="replace")
    assert "VHOST_USER_SET_MEM_TABLE" not in out and "VHOST_USER_SET_FEATURES" not in out


# --- errors ---------------------------------------------------------------

def cli(*args: str) -> tuple[int, str, str]:
    # click < 8.2 (Debian 12 has 8.1.3) mixes stderr into stdout unless told
    # not to; 8.2 keeps them apart and dropped the option.
    kw: dict[str, Any] = ({"mix_stderr": False}
                          if "mix_stderr" in inspect.signature(CliRunner).parameters else {})
    r = CliRunner(**kw).invoke(main, ["probe", *args])
    return r.exit_code, r.stdout, r.stderr


def test_missing_socket(tmp_path: Path) -> None:
    rc, out, err = cli(str(tmp_path / "nope.sock"))
    assert (rc, out, err) == (1, "", f"Error: no such socket: {tmp_path / 'nope.sock'}\n")


def test_nobody_listens(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()                      # the file stays, nobody listens
    rc, _, err = cli(str(path))
    assert (rc, err) == (1, f"Error: connection refused: nothing listens on {path}\n")


def test_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"")
    rc, _, err = cli(str(path))
    assert (rc, err) == (1, f"Error: not a socket: {path}\n")


class FakeBackend:
    """A scripted vhost-user back-end on a thread: answers GET_* from
    ``answers`` (a request missing there is answered by closing the
    connection; answers None closes it right after accept), records every
    request it gets."""

    def __init__(self, path: Path, answers: dict[Request, bytes | None] | None,
                 accept: bool = True) -> None:
        self.path = path
        self.answers = answers
        self.received: list[tuple[Request, bytes]] = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve if accept else lambda: None, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while self.answers is not None and (msg := self._recv(conn)) is not None:
                request, payload = msg
                self.received.append(msg)
                if request == Request.SET_PROTOCOL_FEATURES:
                    continue
                if request not in self.answers:
                    return                              # close on it
                answer = self.answers[request]
                if answer is not None:                  # None: never answer
                    conn.sendall(encode_reply(request, answer))

    @staticmethod
    def _recv(conn: socket.socket) -> tuple[Request, bytes] | None:
        head = conn.recv(HEADER_SIZE, socket.MSG_WAITALL)
        if len(head) < HEADER_SIZE:
            return None
        hdr = Header.unpack(head)
        payload = conn.recv(hdr.size, socket.MSG_WAITALL) if hdr.size else b""
        return Request(hdr.request), payload

    def requests(self) -> list[Request]:
        self.thread.join(5)
        return [r for r, _ in self.received]

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[..., FakeBackend]]:
    made: list[FakeBackend] = []

    def make(answers: dict[Request, bytes | None] | None, accept: bool = True) -> FakeBackend:
        f = FakeBackend(tmp_path / f"fake{len(made)}.sock", answers, accept)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def u64(v: int) -> bytes:
    return U64(v).pack()


BLK_FEATURES = sum(bit(b) for b in (1, 2, 6, 9, 12, 30, 32))
ALL_PROTO = sum(bit(b) for b in range(17))


def blk_config(capacity: int, num_queues: int) -> bytes:
    data = struct.pack("<QII", capacity, 4096, 126).ljust(34, b"\0") + struct.pack("<H", num_queues)
    return Config(0, 60, 0, data.ljust(60, b"\0")).pack()


@pytest.mark.parametrize("answers", [None, {}], ids=["on-accept", "on-first-request"])
def test_peer_closes_immediately(fake: Callable[..., FakeBackend],
                                 answers: dict[Request, bytes | None] | None) -> None:
    f = fake(answers)
    rc, out, err = cli(str(f.path))
    assert (rc, out) == (1, "")
    assert err == ("Error: back-end closed the connection during VHOST_USER_GET_FEATURES "
                   "(it may serve only one front-end at a time and be busy)\n")


def test_peer_never_answers(fake: Callable[..., FakeBackend]) -> None:
    f = fake({Request.GET_FEATURES: None})
    t = time.monotonic()
    rc, _, err = cli("--timeout", "0.5", str(f.path))
    assert time.monotonic() - t < 3
    assert (rc, err) == (1, "Error: timeout: no answer to VHOST_USER_GET_FEATURES within 0.5s "
                            "(it may serve only one front-end at a time and be busy)\n")


def test_busy_peer_never_accepts(fake: Callable[..., FakeBackend]) -> None:
    """A back-end busy with someone else that leaves new connections in
    its listen backlog: the connect succeeds, nothing ever answers."""
    f = fake({}, accept=False)
    with pytest.raises(ProbeError, match="timeout: no answer to VHOST_USER_GET_FEATURES within 0.3s"):
        probe(str(f.path), timeout=0.3)


def test_peer_closes_at_get_protocol_features(fake: Callable[..., FakeBackend]) -> None:
    f = fake({Request.GET_FEATURES: u64(BLK_FEATURES)})
    rc, _, err = cli(str(f.path))
    assert (rc, err) == (1, "Error: back-end closed the connection during "
                            "VHOST_USER_GET_PROTOCOL_FEATURES\n")


def test_garbage_reply_is_named(fake: Callable[..., FakeBackend]) -> None:
    f = fake({Request.GET_FEATURES: b"\x01\x02\x03"})
    with pytest.raises(ProbeError, match=r"^VHOST_USER_GET_FEATURES: bad reply: "):
        probe(str(f.path))


def test_sends_only_questions(fake: Callable[..., FakeBackend]) -> None:
    """Exactly these requests, and SET_PROTOCOL_FEATURES with only MQ,
    CONFIG and CONFIGURE_MEM_SLOTS of all 17 offered bits."""
    f = fake({Request.GET_FEATURES: u64(BLK_FEATURES), Request.GET_PROTOCOL_FEATURES: u64(ALL_PROTO),
              Request.GET_QUEUE_NUM: u64(4), Request.GET_MAX_MEM_SLOTS: u64(509),
              Request.GET_CONFIG: blk_config(12345, 4)})
    r = probe(str(f.path))
    assert f.requests() == [Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES,
                            Request.SET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM,
                            Request.GET_MAX_MEM_SLOTS, Request.GET_CONFIG]
    assert f.received[2][1] == u64(bit(ProtocolFeature.MQ) | bit(ProtocolFeature.CONFIG)
                                   | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS))
    assert (r.queue_num, r.max_mem_slots) == (4, 509)
    fields = r.config_fields()
    assert fields is not None
    assert (fields["capacity_sectors"], fields["seg_max"], fields["num_queues"]) == (12345, 126, 4)
    assert row(r.to_text(), "max memory slots") == "509 (GET_MAX_MEM_SLOTS)"


def test_config_failure_is_a_note(fake: Callable[..., FakeBackend]) -> None:
    """What DPDK does to a non-vDPA GET_CONFIG: the rest is still reported."""
    f = fake({Request.GET_FEATURES: u64(BLK_FEATURES),
              Request.GET_PROTOCOL_FEATURES: u64(bit(ProtocolFeature.MQ) | bit(ProtocolFeature.CONFIG)),
              Request.GET_QUEUE_NUM: u64(1)})
    rc, out, _ = cli("--json", str(f.path))
    assert rc == 0
    j = json.loads(out)
    assert j["queue_num"] == 1 and j["config"] is None
    assert j["notes"] == ["stopped asking: back-end closed the connection during VHOST_USER_GET_CONFIG"]


def test_empty_config_reply_is_a_refusal(fake: Callable[..., FakeBackend]) -> None:
    """libvhost-user answers a GET_CONFIG it cannot serve with size 0."""
    f = fake({Request.GET_FEATURES: u64(BLK_FEATURES),
              Request.GET_PROTOCOL_FEATURES: u64(bit(ProtocolFeature.CONFIG)),
              Request.GET_CONFIG: b""})
    r = probe(str(f.path))
    assert r.config is None and r.queue_num is None
    assert r.notes == ["GET_CONFIG: the back-end refused (empty reply)"]
    assert row(r.to_text(), "queues") == "- (MQ not offered)"


def test_no_protocol_features(fake: Callable[..., FakeBackend]) -> None:
    f = fake({Request.GET_FEATURES: u64(BLK_FEATURES & ~bit(30))})
    r = probe(str(f.path))
    assert f.requests() == [Request.GET_FEATURES]
    assert r.protocol_features is None
    assert r.to_json()["protocol_feature_names"] == []
    assert row(r.to_text(), "protocol features") == "- (VHOST_USER_PROTOCOL_FEATURES not offered)"


def test_unknown_type_reads_no_config(fake: Callable[..., FakeBackend]) -> None:
    """A virtio-fs-like back-end: no device bits, CONFIG offered."""
    f = fake({Request.GET_FEATURES: u64(bit(30) | bit(32)),
              Request.GET_PROTOCOL_FEATURES: u64(bit(ProtocolFeature.CONFIG))})
    rc, out, _ = cli(str(f.path))
    assert rc == 0
    assert Request.GET_CONFIG not in f.requests()
    assert row(out, "device type") == "unknown"
    assert row(out, "note") == "config space not read: its layout depends on the unknown device type"


# --- the type heuristic on real offers ----------------------------------------

@pytest.mark.parametrize("features, expected", [
    (0x170001246, DeviceType.BLOCK),           # vhostd blk
    (0x170001266, DeviceType.BLOCK),           # vhostd blk --read-only (RO = net's MAC bit)
    (0x175007E46, DeviceType.BLOCK),           # qemu-storage-daemon 7.2
    (0x17041FFAB, DeviceType.NET),             # vhostd net
    (0xD7C66E7CB, DeviceType.NET),             # DPDK 22.11 net_vhost
    (0x170000000, DeviceType.UNKNOWN),         # virtio-fs: no device bits
    (0x170000006, DeviceType.UNKNOWN),         # virtio-scsi HOTPLUG|CHANGE (bit 2 = blk SEG_MAX)
    (0x170000200, DeviceType.UNKNOWN),         # one blk vote (FLUSH) is not enough
])
def test_guess_device_type(features: int, expected: DeviceType) -> None:
    assert guess_device_type(features).device_type is expected
