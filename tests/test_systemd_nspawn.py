"""vhostd under a real systemd: a Debian 12 minbase rootfs (debootstrap,
cached in /var/cache/vhostd-tests) booted with systemd-nspawn, systemd as
PID 1.  vhostd is installed as the README's "Install on Debian" says: the
package `./dev deb` builds (tests/debpkg.py), `apt install ./vhostd_*.deb`
pulling its dependencies from Debian's archive only, then the README's
configuration block (its command blocks are read from README.md and run).
The package's units and example configuration are used as they are.
At the end `apt remove` must stop every unit and leave no vhostd process,
`apt purge` must remove the group and /etc/vhostd, and the README's pip
install (wheels in a venv, the units of systemd/ naming /usr/local/bin)
must serve a socket-activated disk in the same container.

Checked: socket activation of every device with a front-end (a QEMU guest
on the host, through /proc/PID/root/run/vhostd/...) connecting before
vhostd runs, READY only after all sockets listen, verified guest I/O and
ping through a tap vhostd created under the hardening, reload, restart on
failure, watchdog, stop, metrics and the control socket under the unit's
hardening (and one line when the hardening refuses metrics), cpu_affinity
and the sandbox under the unit, a disk outside the state directory and on
a loop block device through the README's drop-ins, the template units,
and a journal free of tracebacks.

The container gets its own network namespace (--private-network); its
taps live there."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import guestvm
from unavailable import missing
import debpkg
from vhostd.frontend import BlkDriver, DriverRing, Frontend, GuestRam
from vhostd.protocol.constants import ProtocolFeature, bit

pytestmark = [pytest.mark.guest, pytest.mark.root]

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("VHOSTD_ROOTFS_CACHE", "/var/cache/vhostd-tests"))
# systemd as init, python3-venv for the README's pip install, iproute2 for
# the test's own checks.  Not vhostd's dependencies: apt brings them.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "iproute2")
ROOTFS_FORMAT = "1"
PROTO = bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.CONFIG)
TAP_IP, GUEST_IP = "10.97.0.1", "10.97.0.2"
CONFIG = "/etc/vhostd/vhostd.toml"
DROPIN_DIR = "/etc/systemd/system/vhostd.service.d"


# --- the rootfs -------------------------------------------------------------------------------

def _mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line format)."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for stanza in sources.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines()
                          if ":" in line and not line.startswith("#"))
            if "bookworm" in fields.get("Suites", "").split() and "URIs" in fields:
                return fields["URIs"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == "bookworm":
                return parts[1]
    return "http://deb.debian.org/debian"


def cached_rootfs() -> Path:
    """A bookworm minbase rootfs with PACKAGES, built once per machine (~1-2 min)."""
    key = hashlib.sha256(f"{ROOTFS_FORMAT}\0{' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    root = CACHE / f"bookworm-minbase-{key}"
    if (root / ".vhostd-complete").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".vhostd-complete").exists():
            return root
        tmp = CACHE / f".{root.name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        res = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                              "bookworm", str(tmp), _mirror()], capture_output=True, text=True, timeout=1200)
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.fail(f"debootstrap failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        (tmp / ".vhostd-complete").touch()
        os.rename(tmp, root)
        for old in CACHE.glob("bookworm-minbase-*"):
            if old != root:
                shutil.rmtree(old, ignore_errors=True)
    return root


# --- the container ----------------------------------------------------------------------------

class Container:
    """An overlay of the cached rootfs, booted by systemd-nspawn (ours, by PID)."""

    ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

    def __init__(self, lower: Path, work: Path) -> None:
        self.work = work
        self.root = work / "root"
        for d in ("upper", "ovl", "root"):
            (work / d).mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={work}/upper,workdir={work}/ovl", str(self.root)],
                       check=True)
        (self.root / "etc/hostname").write_text("vhostd-test\n")
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.loops: list[str] = []
        self.apt_log = ""

    def boot(self) -> None:
        self.log = open(self.work / "console.log", "wb")
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.root), "--register=no", "--keep-unit", "--boot",
             "--private-network", "--console=read-only", "-q"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self.leader:
            assert self.nspawn.poll() is None, self.console()
            assert time.monotonic() < deadline, "the container's init did not start"
            self.leader = self._init_pid(self.nspawn.pid)
            time.sleep(0.05)
        while True:      # until systemd answers (its socket appears a moment after exec)
            res = self.sh("systemctl is-system-running --wait", check=False, timeout=90)
            if res.stdout.strip() in ("running", "degraded"):
                break
            assert time.monotonic() < deadline, res.stdout + res.stderr + self.console()
            time.sleep(0.2)

    @staticmethod
    def _init_pid(pid: int) -> int:
        """The container's init: the descendant of nspawn that is PID 1 in its
        own PID namespace (nspawn's first child is a helper that exits)."""
        todo = [pid]
        while todo:
            p = todo.pop()
            try:
                status = Path(f"/proc/{p}/status").read_text()
                children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            except OSError:
                continue
            nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if p != pid and len(nspid) > 1 and nspid[-1] == "1":
                return p
            todo.extend(int(c) for c in children)
        return 0

    def console(self) -> str:
        return (self.work / "console.log").read_text(errors="replace")[-4000:]

    def run(self, argv: list[str], check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "--", "/usr/bin/env", "-i",
                              *(f"{k}={v}" for k, v in self.ENV.items()), *argv],
                             capture_output=True, text=True, timeout=timeout, input=input)
        if check and res.returncode != 0:
            raise AssertionError(f"{argv} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run(["/bin/sh", "-c", script], check=check, timeout=timeout)

    def path(self, inside: str) -> Path:
        """A path of the running container as the host sees it (its sockets too)."""
        return Path(f"/proc/{self.leader}/root{inside}")

    def show(self, unit: str, prop: str) -> str:
        return self.run(["systemctl", "show", "-P", prop, unit]).stdout.strip()

    def journal(self, unit: str | None = None) -> str:
        return self.run(["journalctl", "-b", "--no-pager", "-o", "short-monotonic",
                         *(["-u", unit] if unit else [])]).stdout

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.journal('vhostd')[-3000:]}")
            time.sleep(0.1)

    def close(self) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)      # nspawn powers the container off
            try:
                self.nspawn.wait(30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        if self.nspawn is not None:
            self.log.close()
        for loop in self.loops:
            subprocess.run(["losetup", "-d", loop], check=False)
        subprocess.run(["umount", str(self.root)], check=False)
        shutil.rmtree(self.work, ignore_errors=True)


def _readme_block(marker: str) -> list[str]:
    """The command lines of the ```sh block after <!-- test_systemd_nspawn: marker -->."""
    text = (ROOT / "README.md").read_text()
    at = text.index(f"<!-- test_systemd_nspawn: {marker} -->")
    block = re.search(r"```sh\n(.*?)```", text[at:], re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def _build_wheels(dest: Path, work: Path) -> None:
    """The README's build block, run on a copy of this checkout (so that no
    build/ directory lands in the checkout)."""
    src = work / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    lines = _readme_block("build")
    assert lines[0] == "./dev setup"        # done: this test runs in ./dev's virtual environment
    assert lines[1] == ".venv/bin/python -m pip wheel --wheel-dir wheels ."
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    "--wheel-dir", str(dest), "."], cwd=src, check=True, timeout=600)


def require_nspawn() -> None:
    if os.geteuid() != 0:
        missing("systemd-nspawn tests: root needed")
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "losetup"):
        if shutil.which(tool) is None:
            missing(f"systemd-nspawn tests: {tool} not installed (systemd-container, debootstrap)")
    guestvm.require_guest()


def _fetch_debs(root: Path, deb: str) -> None:
    """Download what `apt install DEB` needs into the rootfs's apt cache,
    from the Debian mirror of its sources.list, through the host's network
    (chroot): the booted container has none (--private-network)."""
    res = subprocess.run(["chroot", str(root), "/bin/sh", "-c",
                          f"apt-get -q update && apt-get install -q -y --download-only {deb}"],
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                         env={**Container.ENV, "DEBIAN_FRONTEND": "noninteractive"})
    assert res.returncode == 0, f"apt-get --download-only:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


@pytest.fixture(scope="module")
def box() -> Iterator[Container]:
    require_nspawn()
    t0 = time.monotonic()
    deb = debpkg.built().deb
    t_deb = time.monotonic() - t0
    lower = cached_rootfs()
    t_rootfs = time.monotonic() - t0 - t_deb
    work = Path(tempfile.mkdtemp(prefix="vhostd-nspawn-", dir="/var/tmp"))
    c = Container(lower, work)
    try:
        inst = c.root / "root/vhostd"
        inst.mkdir(parents=True)
        shutil.copy(deb, inst)
        _fetch_debs(c.root, f"/root/vhostd/{deb.name}")
        # apt in the container answers its own questions (no terminal here).
        (c.root / "etc/apt/apt.conf.d/90vhostd-test").write_text('APT::Get::Assume-Yes "true";\n')
        c.boot()
        lines = _readme_block("deb-install")
        assert lines == ["apt install ./vhostd_*.deb"], lines
        res = c.sh(f"cd /root/vhostd && {lines[0]}", timeout=300)
        c.apt_log = res.stdout
        for line in _readme_block("deb-configure"):     # exactly the README's commands
            c.sh(line, timeout=120)
        print(f"\nnspawn: .deb {t_deb:.1f} s, rootfs {t_rootfs:.1f} s, ready in {time.monotonic() - t0:.1f} s")
        yield c
    finally:
        c.close()


# --- helpers -------------------------------------------------------------------------------------

def _blk_io(sock: Path, sector: int, data: bytes) -> None:
    fe = Frontend(str(sock))
    try:
        fe.negotiate(~0, PROTO)
        ram = GuestRam([2 << 20])
        fe.set_mem_table(ram)
        ring = DriverRing(ram, 0, 32)
        fe.start_ring(ring)
        drv = BlkDriver(ring)
        assert drv.write(sector, data).status == 0
        assert drv.flush().status == 0
        assert drv.read(sector, len(data)).data == data
    finally:
        fe.close()


def _file_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _add_config(c: Container, text: str) -> None:
    c.sh(f"cat >> {CONFIG} <<'EOF'\n{text}\nEOF")


def _dropin(c: Container, name: str, text: str | None) -> None:
    if text is None:
        c.sh(f"rm -f {DROPIN_DIR}/{name}.conf && systemctl daemon-reload")
    else:
        c.sh(f"mkdir -p {DROPIN_DIR} && printf '%s' '{text}' > {DROPIN_DIR}/{name}.conf && systemctl daemon-reload")


def _restart(c: Container) -> None:
    c.run(["systemctl", "restart", "vhostd.service"])
    assert c.show("vhostd.service", "ActiveState") == "active"


def _status(c: Container) -> dict:  # type: ignore[type-arg]
    return json.loads(c.run(["vhostd", "status", "--json"]).stdout)  # type: ignore[no-any-return]


def _journal_lines(c: Container, pattern: str) -> list[str]:
    return [line for line in c.journal("vhostd.service").splitlines() if pattern in line]


# --- the tests ---------------------------------------------------------------------------------

def test_socket_activation_guest_io_and_ping_through_the_containers_sockets(box: Container) -> None:
    c = box
    assert c.show("vhostd.service", "ActiveState") == "inactive"    # the README stopped it
    for dev in ("disk0", "net0"):
        assert c.show(f"vhostd@{dev}.socket", "ActiveState") == "active"
        mode = os.stat(c.path(f"/run/vhostd/{dev}.sock")).st_mode
        assert oct(mode & 0o777) == "0o660"
    # QEMU connects to both sockets before vhostd runs; the first connection starts it.
    disk0, net0 = c.path("/run/vhostd/disk0.sock"), c.path("/run/vhostd/net0.sock")
    script = f"""
set -e
dd if=/dev/urandom of=/tmp/p bs=4k count=64 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=4k seek=100 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=4k skip=100 count=64 iflag=direct 2>/dev/null | cmp - /tmp/p
echo PATTERN $(md5sum < /tmp/p | cut -c1-32)
ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up
ok=""; for i in $(seq 60); do ping -c 1 -W 1 {TAP_IP} >/dev/null 2>&1 && ok=1 && break; sleep 0.5; done
[ -n "$ok" ] && ping -c 3 -W 5 {TAP_IP} | grep -q ' 0% packet loss' && echo PING-OK
"""
    qemu = (guestvm.vhost_user_blk_args(disk0, num_queues=2, chardev_id="disk0")
            + ["-chardev", f"socket,id=net0,path={net0}",
               "-netdev", "vhost-user,id=net0,chardev=net0,queues=2",
               "-device", "virtio-net-pci,netdev=net0,mq=on,vectors=0"])
    with guestvm.start_guest(script, qemu, timeout=180) as g:
        # vhostd created the tap in the container (CAP_NET_ADMIN under the unit's hardening).
        c.wait(lambda: c.run(["ip", "link", "show", "vtap-net0"], check=False).returncode == 0, 60,
               "vtap-net0")
        c.run(["ip", "addr", "add", f"{TAP_IP}/24", "dev", "vtap-net0"])
        res = g.result()
    assert res.rc == 0 and "PING-OK" in res.output, res.describe() + c.journal("vhostd.service")[-6000:]
    m = re.search(r"PATTERN ([0-9a-f]{32})", res.output)
    assert m and hashlib.md5(_file_at(c.path("/var/lib/vhostd/disk0.img"), 100 * 4096, 64 * 4096)
                             ).hexdigest() == m.group(1)
    assert c.show("vhostd.service", "ActiveState") == "active"
    # READY=1 ("Started") only after both inherited sockets listen (in the start the
    # front-end caused, the last one).
    lines = c.journal("vhostd.service").splitlines()
    started = max(i for i, line in enumerate(lines) if "Started vhostd.service" in line)
    starting = max(i for i, line in enumerate(lines[:started]) if "Starting vhostd.service" in line)
    for dev in ("disk0", "net0"):
        assert any(f"{dev}: listening on fd" in line for line in lines[starting:started]), "\n".join(lines)
    st = _status(c)
    assert {d["name"]: d["connections"] for d in st["devices"]} == {"disk0": 1, "net0": 1}, st
    assert c.show("vhostd.service", "StatusText").startswith("serving 2 device(s)")


def test_reload_restart_on_failure_watchdog_and_stop(box: Container) -> None:
    c = box
    c.run(["systemctl", "start", "vhostd.service"])
    # reload (ExecReload=vhostd reload, no /bin/kill in a minbase system): a device added.
    assert not Path(c.path("/bin/kill")).exists() and not Path(c.path("/usr/bin/kill")).exists()
    c.run(["truncate", "-s", "64M", "/var/lib/vhostd/disk1.img"])
    _add_config(c, '[devices.disk1]\ntype = "blk"\nsocket = "/run/vhostd/disk1.sock"\n'
                   'file = "/var/lib/vhostd/disk1.img"\nsocket_group = "vhostd"\n')
    c.run(["systemctl", "reload", "vhostd.service"])
    assert _journal_lines(c, "disk1: started")
    _blk_io(c.path("/run/vhostd/disk1.sock"), 9, b"r" * 4096)
    assert _file_at(c.path("/var/lib/vhostd/disk1.img"), 9 * 512, 4096) == b"r" * 4096
    # A file that does not validate: `systemctl reload` fails, nothing changes.
    c.sh(f"cp {CONFIG} /root/good.toml && echo 'bogus = 1' >> {CONFIG}")
    assert c.run(["systemctl", "reload", "vhostd.service"], check=False).returncode != 0
    assert _journal_lines(c, "reload refused, configuration unchanged")
    assert c.show("vhostd.service", "ActiveState") == "active"
    c.sh(f"cp /root/good.toml {CONFIG}")
    # Restart on failure: SIGKILL, systemd restarts it, the sockets are served again.
    restarts = int(c.show("vhostd.service", "NRestarts"))
    c.run(["systemctl", "kill", "--kill-whom=main", "-s", "SIGKILL", "vhostd.service"])
    c.wait(lambda: int(c.show("vhostd.service", "NRestarts")) == restarts + 1
           and c.show("vhostd.service", "ActiveState") == "active", 30, "restart after SIGKILL")
    c.wait(lambda: c.path("/run/vhostd/disk1.sock").exists(), 10, "disk1 again")
    _blk_io(c.path("/run/vhostd/disk0.sock"), 3, b"k" * 512)
    _blk_io(c.path("/run/vhostd/disk1.sock"), 3, b"k" * 512)
    # Watchdog: pings keep a 2 s WatchdogSec happy; a stopped vhostd is killed and restarted.
    _dropin(c, "watchdog", "[Service]\nWatchdogSec=2s\nTimeoutAbortSec=2s\n")
    _restart(c)
    restarts = int(c.show("vhostd.service", "NRestarts"))
    time.sleep(5)
    assert int(c.show("vhostd.service", "NRestarts")) == restarts
    assert c.show("vhostd.service", "ActiveState") == "active"
    c.run(["systemctl", "kill", "--kill-whom=main", "-s", "SIGSTOP", "vhostd.service"])
    c.wait(lambda: int(c.show("vhostd.service", "NRestarts")) == restarts + 1
           and c.show("vhostd.service", "ActiveState") == "active", 30, "watchdog restart")
    assert "Watchdog timeout" in c.journal("vhostd.service")
    _dropin(c, "watchdog", None)
    _restart(c)
    # Stop: prompt, vhostd's own sockets removed, the socket units' kept for the next start.
    t0 = time.monotonic()
    c.run(["systemctl", "stop", "vhostd.service"])
    assert time.monotonic() - t0 < 5
    assert _journal_lines(c, "received SIGTERM, shutting down")
    assert not c.path("/run/vhostd/control.sock").exists()
    assert not c.path("/run/vhostd/disk1.sock").exists()
    assert c.path("/run/vhostd/disk0.sock").exists()     # vhostd@disk0.socket
    c.run(["systemctl", "start", "vhostd.service"])


def test_metrics_control_socket_cpu_affinity_and_sandbox_under_the_hardening(box: Container) -> None:
    c = box
    c.sh(f"sed -i 's|^# metrics_listen = .*|metrics_listen = \"127.0.0.1:9464\"|; "
         f"s|^# cpu_affinity = .*|cpu_affinity = [0]|; s|^# sandbox = .*|sandbox = true|' {CONFIG}")
    _restart(c)
    _blk_io(c.path("/run/vhostd/disk0.sock"), 20, b"m" * 4096)
    body = c.run(["python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                  "'http://127.0.0.1:9464/metrics', timeout=5).read().decode())"]).stdout
    assert 'vhostd_device_frontend_connected{device="disk0",' in body, body
    assert 'vhostd_device_frontend_connected{device="net0",' in body, body
    st = _status(c)                                       # the control socket
    assert st["endpoints"]["metrics_listen"]["error"] is None
    assert st["sandbox"]["capabilities"] == ["CAP_NET_ADMIN"], st["sandbox"]
    assert _journal_lines(c, "pinned to CPUs [0]") and _journal_lines(c, "sandbox on")
    # The hardening refuses TCP: one line naming the setting, the devices served, status says so.
    _dropin(c, "nometrics", "[Service]\nRestrictAddressFamilies=~AF_INET AF_INET6\n")
    _restart(c)
    lines = [line for line in _journal_lines(c, "metrics_listen 127.0.0.1:9464")
             if "address family not allowed" in line]
    assert len(lines) == 1 and "RestrictAddressFamilies=" in lines[0], lines
    text = c.run(["vhostd", "status"]).stdout
    assert "metrics_listen 127.0.0.1:9464: FAILED: address family not allowed" in text, text
    _blk_io(c.path("/run/vhostd/disk0.sock"), 21, b"n" * 512)
    assert "metrics_listen failed" in c.show("vhostd.service", "StatusText")
    _dropin(c, "nometrics", None)
    c.sh(f"sed -i 's|^metrics_listen = .*|# metrics_listen = \"127.0.0.1:9464\"|; "
         f"s|^cpu_affinity = .*|# cpu_affinity = [0, 1]|; s|^sandbox = .*|# sandbox = false|' {CONFIG}")
    _restart(c)


def test_disks_outside_the_state_directory_and_on_a_loop_device_via_dropins(box: Container,
                                                                            tmp_path: Path) -> None:
    c = box
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(64 << 20)
    loop = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True, capture_output=True,
                          text=True).stdout.strip()
    c.loops.append(loop)
    rdev = os.stat(loop).st_rdev
    c.run(["mknod", "/dev/vhostd-test-loop", "b", str(os.major(rdev)), str(os.minor(rdev))])
    c.sh("mkdir -p /srv/images && truncate -s 64M /srv/images/srv0.img")
    _add_config(c, '[devices.srv0]\ntype = "blk"\nsocket = "/run/vhostd/srv0.sock"\n'
                   'file = "/srv/images/srv0.img"\nsocket_group = "vhostd"\n\n'
                   '[devices.loop0]\ntype = "blk"\nsocket = "/run/vhostd/loop0.sock"\n'
                   'file = "/dev/vhostd-test-loop"\nsocket_group = "vhostd"\n')
    c.run(["systemctl", "reload", "vhostd.service"])
    # Without the drop-in: srv0 alone fails, with the drop-in to add in its message.
    assert _status(c)["failed"]["srv0"].endswith(
        "/srv/images/srv0.img: Read-only file system (under systemd's ProtectSystem=strict: allow its "
        "directory with ReadWritePaths= in a drop-in, see README)")
    # The README's drop-in, with this test's paths.
    _dropin(c, "storage", "[Service]\nReadWritePaths=/srv/images\nDeviceAllow=/dev/vhostd-test-loop rw\n")
    _restart(c)
    assert "/dev/vhostd-test-loop rw" in c.show("vhostd.service", "DeviceAllow")
    st = _status(c)
    assert not st["failed"] and {"srv0", "loop0"} <= {d["name"] for d in st["devices"]}, st
    _blk_io(c.path("/run/vhostd/srv0.sock"), 40, b"s" * 4096)
    _blk_io(c.path("/run/vhostd/loop0.sock"), 50, b"l" * 4096)
    assert _file_at(c.path("/srv/images/srv0.img"), 40 * 512, 4096) == b"s" * 4096
    assert _file_at(backing, 50 * 512, 4096) == b"l" * 4096


def test_template_units_with_socket_activation(box: Container) -> None:
    c = box
    c.sh("truncate -s 64M /var/lib/vhostd/tdisk.img && "       # the package's template units
         "printf 'VHOSTD_BLK_FILE=/var/lib/vhostd/tdisk.img\\nVHOSTD_BLK_OPTS=--num-queues 2 --serial tdisk\\n' "
         "> /etc/vhostd/blk-tdisk.env && "
         "printf 'VHOSTD_TAP=vtap-tnet\\nVHOSTD_NET_OPTS=--queue-pairs 2\\n' > /etc/vhostd/net-tnet.env && "
         "systemctl daemon-reload && systemctl enable --now vhostd-blk@tdisk.socket vhostd-net@tnet.socket")
    assert c.show("vhostd-blk@tdisk.service", "ActiveState") == "inactive"
    _blk_io(c.path("/run/vhostd/tdisk.sock"), 5, b"t" * 4096)           # starts the service
    assert _file_at(c.path("/var/lib/vhostd/tdisk.img"), 5 * 512, 4096) == b"t" * 4096
    assert c.show("vhostd-blk@tdisk.service", "ActiveState") == "active"
    probe = subprocess.run([sys.executable, "-m", "vhostd", "probe", "--json",
                            str(c.path("/run/vhostd/tnet.sock"))], capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0, probe.stderr
    assert c.show("vhostd-net@tnet.service", "ActiveState") == "active"
    c.run(["ip", "link", "show", "vtap-tnet"])                             # the tap it created
    c.run(["systemctl", "stop", "vhostd-net@tnet.service", "vhostd-blk@tdisk.service"])
    assert c.run(["ip", "link", "show", "vtap-tnet"], check=False).returncode != 0   # removed on exit


def test_journal_has_no_traceback(box: Container) -> None:
    journal = box.journal()
    assert "vhostd" in journal
    bad = [line for line in journal.splitlines() if "Traceback" in line or "Exception Group" in line]
    assert not bad, "\n".join(bad)


# --- the package: where it came from, removal, purge; then the pip install ------------------

_PROCS = """
import os
for pid in os.listdir('/proc'):
    if pid.isdigit() and int(pid) != os.getpid():
        try:
            cmd = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ').decode()
        except OSError:
            continue
        if 'vhostd' in cmd:
            print(pid, cmd)
"""


def _vhostd_processes(c: Container) -> list[str]:
    return c.run(["python3", "-c", _PROCS]).stdout.splitlines()


def _active_units(c: Container) -> list[str]:
    out = c.run(["systemctl", "list-units", "--all", "--plain", "--no-legend", "vhostd*"]).stdout
    return [line for line in out.splitlines()
            if len(line.split()) > 2 and line.split()[2] in ("active", "activating", "reloading", "deactivating")]


def _listens(path: Path) -> bool:
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def test_the_package_and_its_dependencies_came_from_debian(box: Container) -> None:
    c = box
    # apt pulled the dependencies from the archive; the only local package is vhostd itself.
    for pkg in ("python3-trio", "python3-click", "python3-pyroute2", "python3-prometheus-client",
                "python3-cffi-backend", "liburing2"):
        assert re.search(rf"^Setting up {pkg}(:amd64)? \(", c.apt_log, re.M), c.apt_log
    listing = c.run(["apt", "list", "--installed"]).stdout
    local = [line for line in listing.splitlines() if ",local]" in line]
    assert [line.split("/")[0] for line in local] == ["vhostd"], local
    # What vhostd runs on is Debian's, owned by dpkg; nothing under /usr/local, no pip.
    files = c.run(["python3", "-c", "import vhostd._native, trio, click, pyroute2, prometheus_client, "
                   "_cffi_backend as b; print(*(m.__file__ for m in (vhostd._native, trio, click, pyroute2, "
                   "prometheus_client, b)))"]).stdout.split()
    assert all(f.startswith("/usr/lib/python3/dist-packages/") for f in files), files
    c.run(["dpkg", "-S", *files])
    assert c.run(["python3", "-m", "pip", "--version"], check=False).returncode != 0
    assert c.run(["find", "/usr/local/bin", "/usr/local/lib", "-mindepth", "1", "-not", "-type", "d"]).stdout == ""
    from vhostd import __version__
    assert c.run(["vhostd", "--version"]).stdout == f"vhostd {__version__}\n"
    assert "path=/usr/bin/vhostd" in c.show("vhostd.service", "ExecStart")
    assert c.show("vhostd.service", "FragmentPath") == "/lib/systemd/system/vhostd.service"
    assert c.show("vhostd.service", "UnitFileState") == "enabled"          # dh_installsystemd's default
    assert c.show("vhostd@disk0.socket", "UnitFileState") == "enabled"     # the README's configuration


def test_reinstall_as_an_upgrade_restarts_the_services_and_keeps_the_configuration(box: Container) -> None:
    c = box
    c.run(["systemctl", "start", "vhostd.service"])
    _blk_io(c.path("/run/vhostd/tdisk.sock"), 6, b"v" * 512)          # socket-activates vhostd-blk@tdisk
    before = {u: c.show(u, "MainPID") for u in ("vhostd.service", "vhostd-blk@tdisk.service")}
    config = c.path(CONFIG).read_text()
    assert "[devices.disk0]" in config
    c.run(["sh", "-c", "cd /root/vhostd && apt install --reinstall ./vhostd_*.deb"], timeout=120)
    for unit, pid in before.items():       # postinst: restart, and try-restart of the instances
        assert c.show(unit, "ActiveState") == "active", unit
        assert c.show(unit, "MainPID") not in (pid, "0"), unit
    assert c.path(CONFIG).read_text() == config                          # the edited conffile kept
    for sock in ("vhostd@disk0.socket", "vhostd@net0.socket", "vhostd-blk@tdisk.socket"):
        assert c.show(sock, "ActiveState") == "active", sock
    _blk_io(c.path("/run/vhostd/disk0.sock"), 8, b"w" * 512)
    _blk_io(c.path("/run/vhostd/tdisk.sock"), 8, b"w" * 512)


def test_apt_remove_stops_every_unit_and_leaves_no_process(box: Container) -> None:
    c = box
    c.run(["systemctl", "start", "vhostd.service"])
    _blk_io(c.path("/run/vhostd/tdisk.sock"), 6, b"u" * 512)          # socket-activates vhostd-blk@tdisk if needed
    assert c.show("vhostd-blk@tdisk.service", "ActiveState") == "active"
    running = _vhostd_processes(c)
    assert any("vhostd serve" in p for p in running) and any("vhostd blk" in p for p in running), running
    c.run(["apt", "remove", "vhostd"], timeout=120)
    assert not _active_units(c)
    assert not _vhostd_processes(c)
    for name in ("disk0", "net0", "tdisk", "tnet", "control"):
        assert not _listens(c.path(f"/run/vhostd/{name}.sock")), name
    assert c.run(["ip", "link", "show", "vtap-net0"], check=False).returncode != 0   # vhostd's tap, removed
    # Configuration and group stay until purge.
    assert c.path("/etc/vhostd/vhostd.toml").exists()
    c.run(["getent", "group", "vhostd"])


def test_apt_purge_removes_the_group_and_configuration(box: Container) -> None:
    c = box
    wants = c.path("/etc/systemd/system/sockets.target.wants")
    assert os.path.islink(wants / "vhostd@disk0.socket")
    c.run(["apt", "purge", "vhostd"], timeout=120)
    assert c.run(["dpkg", "-s", "vhostd"], check=False).returncode != 0
    assert c.run(["getent", "group", "vhostd"], check=False).returncode == 2
    assert not c.path("/etc/vhostd").exists()
    links = [f"{d}/{f}" for d in os.listdir(c.path("/etc/systemd/system")) if d.endswith(".wants")
             for f in os.listdir(c.path(f"/etc/systemd/system/{d}")) if "vhostd" in f]
    assert not links
    assert c.path("/var/lib/vhostd/disk0.img").exists()                 # data: kept
    assert not _vhostd_processes(c) and not _active_units(c)


def test_readme_pip_install_serves_a_socket_activated_disk(box: Container, tmp_path: Path) -> None:
    """The README's other install, in the same (purged) container: wheels in
    a venv, the units of systemd/ (naming /usr/local/bin) in /etc."""
    c = box
    inst = c.root / "root/vhostd"        # the overlay, as mounted on the host (not through /proc)
    _build_wheels(inst / "wheels", tmp_path)
    shutil.copytree(ROOT / "systemd", inst / "systemd")
    for line in _readme_block("install"):
        c.sh(f"cd /root/vhostd && {line}", timeout=300)
    assert c.show("vhostd.service", "FragmentPath") == "/etc/systemd/system/vhostd.service"
    assert "path=/usr/local/bin/vhostd" in c.show("vhostd.service", "ExecStart")
    assert c.show("vhostd.service", "ActiveState") == "inactive"
    _blk_io(c.path("/run/vhostd/disk0.sock"), 7, b"p" * 4096)          # starts vhostd.service
    assert c.show("vhostd.service", "ActiveState") == "active"
    assert _file_at(c.path("/var/lib/vhostd/disk0.img"), 7 * 512, 4096) == b"p" * 4096
    assert {d["name"] for d in _status(c)["devices"]} == {"disk0", "net0"}
    assert "/opt/vhostd/bin/python" in "".join(_vhostd_processes(c))
    c.run(["systemctl", "stop", "vhostd@disk0.socket", "vhostd@net0.socket", "vhostd.service"])
    bad = [line for line in c.journal().splitlines() if "Traceback" in line or "Exception Group" in line]
    assert not bad, "\n".join(bad)
