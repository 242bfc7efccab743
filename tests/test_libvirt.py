"""libvirt end to end: Debian's libvirt 9.0 (libvirt-daemon-system; libvirtd
and virtlogd started here when nothing runs them) defines and starts a
TCG domain whose vhostd disk and NIC are the README's XML, taken from
README.md as written (only /run/vhostd/ is replaced by this test's
directory).  vhostd serves the shipped systemd/vhostd.toml (paths and tap
name changed, sandbox on) with the shipped socket permissions: 0660
root:vhostd in a 0755 directory, libvirt-qemu being a member of vhostd as
the README says.  The guest (tests/guestvm.py's kernel and initramfs,
booted directly) writes patterns and pings the tap; `virsh destroy` and
`virsh start` again reuse the same vhostd devices and read them back."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

import guestvm
import vhostd_proc
from netns import NetNs
from unavailable import missing

pytestmark = [pytest.mark.guest, pytest.mark.root]

ROOT = Path(__file__).resolve().parent.parent
URI = "qemu:///system"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
TAP_IP, GUEST_IP = "10.96.0.1", "10.96.0.2"
DISK_SIZE = 64 << 20


def virsh(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {res.stdout}{res.stderr}")
    return res


def _pid(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    """libvirtd and virtlogd: the running ones, or started by hand (no systemd
    runs them on a CI machine) and stopped again by PID."""
    if os.geteuid() != 0:
        missing("libvirt tests: root needed")
    for tool in ("virsh", "libvirtd", "virtlogd"):
        if shutil.which(tool) is None:
            missing(f"libvirt tests: {tool} not installed (libvirt-daemon-system, libvirt-clients)")
    guestvm.require_guest()
    started: list[int] = []
    if virsh("version", check=False, timeout=20).returncode != 0:
        for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
            if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode != 0:
                subprocess.run([daemon, "-d"], check=True, timeout=30)
                deadline = time.monotonic() + 10
                while (pid := _pid(pidfile)) is None:
                    assert time.monotonic() < deadline, f"{daemon} wrote no {pidfile}"
                    time.sleep(0.05)
                started.append(pid)
        deadline = time.monotonic() + 30
        while virsh("version", check=False, timeout=20).returncode != 0:
            assert time.monotonic() < deadline, "libvirtd does not answer"
            time.sleep(0.2)
    yield
    for pid in reversed(started):
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass


def _readme_domain() -> ET.Element:
    text = (ROOT / "README.md").read_text()
    at = text.index("<!-- test_libvirt: domain -->")
    m = re.search(r"```xml\n(.*?)```", text[at:], re.S)
    assert m is not None
    ET.register_namespace("qemu", QEMU_NS)
    return ET.fromstring(m.group(1))


def _domain_xml(name: str, d: Path, kernel: Path, initrd: Path) -> str:
    """A TCG domain booting the test guest directly, with the README's
    memoryBacking, vhostd disk and NIC, and qemu:override."""
    readme = _readme_domain()
    dom = ET.fromstring(f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <sysinfo type='fwcfg'><entry name='{guestvm.FW_CFG_NAME}' file='{d}/script.sh'/></sysinfo>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='{d}/console.log'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>""")
    devices = dom.find("devices")
    assert devices is not None
    dom.insert(2, readme.find("memoryBacking"))  # type: ignore[arg-type]
    readme_devices = readme.find("devices")
    assert readme_devices is not None
    for dev in readme_devices:
        devices.append(dev)
    override = readme.find(f"{{{QEMU_NS}}}override")
    assert override is not None
    dom.append(override)
    text = ET.tostring(dom, encoding="unicode")
    assert text.count("/run/vhostd/") == 2
    return text.replace("/run/vhostd/", f"{d}/")


def _shipped_config(d: Path) -> str:
    """systemd/vhostd.toml with this test's paths and tap, and the sandbox on."""
    text = (ROOT / "systemd" / "vhostd.toml").read_text()
    text = text.replace("/run/vhostd/", f"{d}/").replace("/var/lib/vhostd/", f"{d}/")
    text = text.replace('tap = "vtap-net0"', 'tap = "vtlibvirt0"')
    text = re.sub(r"(?m)^# sandbox = .*$", "sandbox = true", text)
    assert 'socket_group = "vhostd"' in text and "sandbox = true" in text
    return text


def _wait_shutoff(name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while virsh("domstate", name).stdout.strip() != "shut off":
        assert time.monotonic() < deadline, f"{name} still {virsh('domstate', name).stdout}"
        time.sleep(0.2)


def _console(d: Path) -> str:
    try:
        raw = (d / "console.log").read_bytes()
    except FileNotFoundError:
        return ""
    return raw.decode(errors="replace").replace("\r\n", "\n").replace("\r", "")


def test_readme_domain_with_vhostd_disk_and_nic_destroy_and_start_again(libvirtd: None, ns: NetNs) -> None:
    # The README's setup: the vhostd group (systemd/vhostd.sysusers) with libvirt-qemu in it.
    subprocess.run(["install", "-Dm644", str(ROOT / "systemd/vhostd.sysusers"), "/etc/sysusers.d/vhostd.conf"],
                   check=True)
    subprocess.run(["systemd-sysusers"], check=True)
    subprocess.run(["usermod", "-aG", "vhostd", "libvirt-qemu"], check=True)

    d = Path(f"/run/vhostd-libvirt-test-{os.getpid()}")      # like /run/vhostd: 0755, root
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    name = f"vhostd-test-{os.getpid()}"
    v: vhostd_proc.Vhostd | None = None
    try:
        kernel = d / "vmlinux"
        initrd = d / "initrd"
        shutil.copyfile(guestvm.guest_kernel(), kernel)
        shutil.copyfile(guestvm.build_initramfs(), initrd)
        image = d / "disk0.img"
        with open(image, "wb") as f:
            f.truncate(DISK_SIZE)
        cfg = d / "vhostd.toml"
        cfg.write_text(_shipped_config(d))
        v = vhostd_proc.Vhostd(["serve", "--config", str(cfg)], d / "net0.sock", d / "vhostd.log",
                               prefix=ns.cmd([]))
        assert (d / "disk0.sock").exists()
        ns.run(["ip", "addr", "add", f"{TAP_IP}/24", "dev", "vtlibvirt0"])
        for sock in ("disk0.sock", "net0.sock"):
            st = os.stat(d / sock)
            assert oct(st.st_mode & 0o777) == "0o660" and st.st_gid == _gid("vhostd")

        (d / "script.sh").write_text(f"""
set -e
echo QUEUES $(ls /sys/block/vda/mq | wc -l) $(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)
dd if=/dev/urandom of=/tmp/p bs=4k count=64 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=4k seek=10 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=4k skip=10 count=64 iflag=direct 2>/dev/null | cmp - /tmp/p
echo PATTERN $(md5sum < /tmp/p | cut -c1-32)
ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up
ping -c 3 -W 5 {TAP_IP} | grep -q ' 0% packet loss' && echo PING-OK
echo WAITING-FOR-DESTROY
sleep 600
""")
        os.chmod(d / "script.sh", 0o644)
        (d / "domain.xml").write_text(_domain_xml(name, d, kernel, initrd))
        virsh("define", str(d / "domain.xml"))
        t0 = time.monotonic()
        virsh("start", name)
        start_s = time.monotonic() - t0
        deadline = time.monotonic() + 180
        while "WAITING-FOR-DESTROY" not in _console(d):
            assert time.monotonic() < deadline and virsh("domstate", name).stdout.strip() == "running", \
                _console(d) + v.log()
            time.sleep(0.2)
        out = _console(d)
        assert "QUEUES 2 2" in out and "PING-OK" in out, out
        m = re.search(r"PATTERN ([0-9a-f]{32})", out)
        assert m, out
        with open(image, "rb") as f:
            f.seek(10 * 4096)
            assert hashlib.md5(f.read(64 * 4096)).hexdigest() == m.group(1)
        virsh("destroy", name)

        # Start again: the same vhostd devices, the data still there.
        (d / "console.log").unlink()
        (d / "script.sh").write_text(f"""
echo READ $(dd if=/dev/vda bs=4k skip=10 count=64 iflag=direct 2>/dev/null | md5sum | cut -c1-32)
ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up
ping -c 3 -W 5 {TAP_IP} | grep -q ' 0% packet loss' && echo PING-OK
""")
        virsh("start", name)
        _wait_shutoff(name, 180)
        out = _console(d)
        assert f"READ {m.group(1)}" in out and "PING-OK" in out, out + v.log()
        assert v.alive()
        log = v.log()
        assert log.count("disk0: front-end connected") == 2 and log.count("net0: front-end connected") == 2, log
        assert "sandbox on" in log and "Traceback" not in log
        # vhostd offers net no CONFIG: QEMU used to warn about it on every start.
        qemu_log = Path(f"/var/log/libvirt/qemu/{name}.log").read_text()
        assert "PROTOCOL_F_CONFIG" not in qemu_log, qemu_log
        print(f"\nlibvirt: virsh start returned in {start_s:.2f} s")
    finally:
        if virsh("dominfo", name, check=False).returncode == 0:
            virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)
        if v is not None:
            assert v.stop() == 0, v.log()
        shutil.rmtree(d, ignore_errors=True)


def _gid(group: str) -> int:
    import grp
    return grp.getgrnam(group).gr_gid
