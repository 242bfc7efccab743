"""Boot tiny Linux guests under QEMU (TCG) so tests can drive back-ends from real virtio drivers.

A test hands :func:`run_guest` (or :func:`start_guest`) a shell script and the QEMU arguments
that attach its devices (e.g. a vhost-user-blk chardev).  The guest is the host's Debian
kernel plus a busybox initramfs built here (no root, no extra packages); its /init loads the
virtio drivers, reads the script from fw_cfg, runs it between two console markers and powers
off.  fio, iperf3 and ethtool are in the initramfs with their shared libraries.

Guest facts: the first virtio-blk disk is /dev/vda, the first virtio-net NIC eth0.  Under
TCG, QEMU 7.2 crashes with vhost-user-net and MSI-X: give that device `vectors=0`.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Sequence

BEGIN_MARKER = "VHOSTD-GUEST-BEGIN"
END_MARKER = "VHOSTD-GUEST-END"
FW_CFG_NAME = "opt/vhostd/script"

# The Debian kernel builds these as modules; dependencies come from modules.dep.
GUEST_MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_mem",
    "crc32c_generic",   # ext4's soft dependency (crypto-crc32c): modules.dep does not name it
    "ext4",
    "qemu_fw_cfg",
)
# util-linux's blkdiscard (busybox's has no -z), e2fsprogs' mke2fs (mke2fs -t ext4).
GUEST_BINARIES: tuple[str, ...] = ("fio", "iperf3", "ethtool", "blkdiscard", "mke2fs")

# Bump when the layout of the initramfs changes in a way the input hash cannot see.
_FORMAT_VERSION = "1"
_END_RE = re.compile(re.escape(END_MARKER) + r" rc=(\d+)")

_INIT_TEMPLATE = r"""#!/bin/sh
# PID 1 of a vhostd test guest: load virtio drivers, run the script from fw_cfg, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t devtmpfs devtmpfs /dev
# The kernel may have started us without a console (no /dev yet): attach to it now.
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t devpts devpts /dev/pts
for m in @MODULES@; do
    insmod "$m" || echo "vhostd-guest: insmod $m failed"
done
ip link set lo up
# Keep kernel messages from interleaving with the script's output; the script can run dmesg.
echo 1 > /proc/sys/kernel/printk
S=/sys/firmware/qemu_fw_cfg/by_name/@FWCFG@/raw
if [ -r "$S" ]; then
    cat "$S" > /tmp/script.sh
else
    echo 'echo "vhostd-guest: no script in fw_cfg"; exit 127' > /tmp/script.sh
fi
cd /tmp
echo @BEGIN@
sh /tmp/script.sh </dev/null
rc=$?
# A newline first so the end marker starts its own line even after output without one.
echo
echo "@END@ rc=$rc"
sync
poweroff -f
"""


class GuestError(RuntimeError):
    """The guest cannot be built or started on this machine."""


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_cache_dir() -> Path:
    env = os.environ.get("VHOSTD_TEST_CACHE")
    return Path(env) if env else repo_root() / ".cache" / "guest"


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    # "6.1.0-56-amd64" sorts numerically per component, so 6.10 > 6.9.
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", version))


def kernel_path() -> Path:
    """The newest installed /boot/vmlinuz-<version>."""
    kernels = [p for p in Path("/boot").glob("vmlinuz-*") if p.is_file()]
    if not kernels:
        raise GuestError("no /boot/vmlinuz-* (install linux-image-amd64)")
    return max(kernels, key=lambda p: _version_key(p.name[len("vmlinuz-"):]))


def kernel_version() -> str:
    return kernel_path().name[len("vmlinuz-"):]


def guest_kernel(cache_dir: Path | None = None) -> Path:
    """The kernel to boot: the uncompressed ELF vmlinux if the kernel supports PVH, else bzImage.

    QEMU boots an ELF vmlinux with a PVH note directly; that skips SeaBIOS's linuxboot ROM
    and the kernel's own xz decompression, which under TCG cost ~3 s of every boot.
    """
    bzimage = kernel_path()
    version = kernel_version()
    config = Path("/boot", f"config-{version}")
    if not (config.is_file() and "\nCONFIG_PVH=y\n" in config.read_text()):
        return bzimage
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    st = bzimage.stat()
    out = cache_dir / f"vmlinux-{version}-{st.st_size}-{st.st_mtime_ns}"
    if out.exists():
        return out
    elf = _extract_vmlinux(bzimage.read_bytes())
    if elf is None:
        return bzimage
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(elf)
    os.replace(tmp, out)
    _prune(cache_dir, "vmlinux-*", keep=out)
    return out


def _prune(cache_dir: Path, pattern: str, keep: Path) -> None:
    # Each stale kernel or initramfs is 60-90 MB.  A QEMU still booting from one keeps
    # reading its open file after the unlink.
    for old in cache_dir.glob(pattern):
        if old != keep:
            old.unlink(missing_ok=True)


def _extract_vmlinux(image: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage (its compressed payload), or None."""
    candidates: list[tuple[bytes, Callable[[bytes], bytes]]] = [
        (b"\xfd7zXZ\x00", lambda d: lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(d)),
        (b"\x1f\x8b\x08", lambda d: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(d)),
    ]
    for magic, decompress in candidates:
        # The magic may occur by chance in the setup code: try each place until one gives an ELF.
        at = image.find(magic)
        while at >= 0:
            try:
                elf = decompress(image[at:])
                if elf.startswith(b"\x7fELF"):
                    return bytes(elf)
            except (lzma.LZMAError, zlib.error):
                pass
            at = image.find(magic, at + 1)
    return None


def qemu_binary() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise GuestError("qemu-system-x86_64 not found (install qemu-system-x86)")
    return qemu


def unavailable_reason() -> str | None:
    """Why guests cannot run here, or None if they can (for pytest.skip)."""
    try:
        qemu_binary()
        version = kernel_version()
        if not Path("/lib/modules", version, "modules.dep").is_file():
            return f"no /lib/modules/{version}/modules.dep"
        for tool in ("busybox", *GUEST_BINARIES):
            if shutil.which(tool) is None:
                return f"{tool} not found"
    except GuestError as exc:
        return str(exc)
    return None


def require_guest() -> None:
    """Skips a guest test where QEMU or the kernel is missing; in CI (CI set) that fails."""
    from unavailable import missing   # pytest only here: bench/ imports this module too

    reason = unavailable_reason()
    if reason is not None:
        missing(f"guest tests: {reason}")


# --- initramfs -------------------------------------------------------------------------------


def _module_files(version: str, names: Iterable[str]) -> list[Path]:
    """Module files for `names` and their dependencies, in load order."""
    moddir = Path("/lib/modules", version)
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    builtin_file = moddir / "modules.builtin"
    builtin = (
        {_module_name(p) for p in builtin_file.read_text().split()} if builtin_file.exists() else set()
    )
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise GuestError(f"kernel module {name} not found for {version}")
    return [moddir / p for p in order]


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    return base[: base.index(".ko")].replace("-", "_")


def _shared_libraries(binary: str) -> list[str]:
    """The dynamic loader and every library `binary` needs, as the loader resolves them."""
    loader = "/lib64/ld-linux-x86-64.so.2"
    # Mask glibc-hwcaps subdirectories: a library optimised for the host CPU (x86-64-v3)
    # would crash on the TCG guest CPU.
    out = subprocess.run(
        [loader, "--glibc-hwcaps-mask", "", "--list", binary],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    libs: list[str] = []
    for line in out.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].strip()
            if target.startswith("not found"):
                raise GuestError(f"{binary}: {line}")
            if target.startswith("/"):
                libs.append(target.split()[0])
        elif line.startswith("/"):
            libs.append(line.split()[0])
    return libs


class _Cpio:
    """A newc ("070701") cpio archive written in order; parents must precede children."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._ino = 0
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        raw = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0,  # ino, mode, uid, gid
            2 if mode & 0o040000 else 1,  # nlink
            0, len(data),  # mtime, filesize
            0, 0, rdev[0], rdev[1],  # devmajor, devminor, rdevmajor, rdevminor
            len(raw), 0,  # namesize, check
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + raw + b"\0" * (-(len(header) + len(raw)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))
        self.names.add(name)

    def directory(self, name: str) -> None:
        if name not in self.names:
            self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def symlink(self, name: str, target: str) -> None:
        if name not in self.names:
            self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def trailer(self) -> None:
        self._entry("TRAILER!!!", 0)


class _Tree:
    """Mirrors host paths into the archive, symlinked directories (merged /usr) included."""

    def __init__(self, cpio: _Cpio) -> None:
        self.cpio = cpio

    def host_dir(self, path: str) -> str:
        """Recreate host directory `path` (and symlinks on the way); return its archive name."""
        cur = ""
        parts = [p for p in path.split("/") if p]
        for i, part in enumerate(parts):
            cur = f"{cur}/{part}"
            if os.path.islink(cur):
                target = os.readlink(cur)
                self.cpio.symlink(cur.lstrip("/"), target)
                resolved = os.path.normpath(os.path.join(os.path.dirname(cur), target))
                return self.host_dir("/".join([resolved, *parts[i + 1:]]))
            self.cpio.directory(cur.lstrip("/"))
        return cur.lstrip("/")

    def host_file(self, path: str, data: bytes | None = None, name: str | None = None) -> str:
        """Copy host file `path` (contents `data` if given) to the same place in the archive."""
        parent, base = os.path.split(path)
        arc_parent = self.host_dir(parent)
        host = os.path.join(parent, base)
        if os.path.islink(host):
            target = os.readlink(host)
            self.cpio.symlink(f"{arc_parent}/{base}", target)
            return self.host_file(os.path.normpath(os.path.join(parent, target)), data)
        arc = f"{arc_parent}/{name or base}"
        if arc not in self.cpio.names:
            perm = os.stat(host).st_mode & 0o7777
            self.cpio.file(arc, Path(host).read_bytes() if data is None else data, perm)
        return "/" + arc


def _plain_ko_name(path: Path) -> str:
    return path.name[: path.name.index(".ko")] + ".ko"


def _module_bytes(path: Path) -> bytes | None:
    """A compressed module's decompressed bytes; None if it is a plain .ko.

    Busybox's insmod cannot be relied on to decompress, so modules are stored as plain .ko.
    """
    name = str(path)
    if name.endswith(".ko"):
        return None
    raw = path.read_bytes()
    if name.endswith(".xz"):
        return lzma.decompress(raw)
    if name.endswith(".gz"):
        return gzip.decompress(raw)
    if name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise GuestError(f"{path} is zstd-compressed; install zstd")
        return subprocess.run([zstd, "-dc", name], check=True, capture_output=True).stdout
    raise GuestError(f"unknown module compression: {path}")


def _inputs() -> tuple[str, list[Path], list[str], str]:
    """Kernel version, module files, host files (binaries + libraries) and busybox path."""
    version = kernel_version()
    modules = _module_files(version, GUEST_MODULES)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise GuestError("busybox not found (install busybox-static)")
    files: list[str] = []
    for tool in GUEST_BINARIES:
        found = shutil.which(tool)
        if found is None:
            raise GuestError(f"{tool} not found")
        for f in (found, *_shared_libraries(found)):
            if f not in files:
                files.append(f)
    return version, modules, files, busybox


def build_initramfs(cache_dir: Path | None = None, *, compress: bool = False) -> Path:
    """Build (or reuse from `cache_dir`) the newc cpio initramfs for the guest.

    The cache key hashes everything that goes in: kernel version, /init text and the
    path, size and mtime of every copied file.  Uncompressed by default: the archive is
    ~90 MB (fio drags in ceph, gluster, ICU...), and inflating its gzip form costs the
    TCG guest ~1.3 s per boot; `compress=True` writes a gzip'd one (~37 MB) instead.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    version, modules, files, busybox = _inputs()
    mod_names = [str(p.parent / _plain_ko_name(p)) for p in modules]
    init = (
        _INIT_TEMPLATE.replace("@MODULES@", " ".join(mod_names))
        .replace("@FWCFG@", FW_CFG_NAME)
        .replace("@BEGIN@", BEGIN_MARKER)
        .replace("@END@", END_MARKER)
    )
    digest = hashlib.sha256()
    digest.update(f"{_FORMAT_VERSION}\0{version}\0{init}\0".encode())
    for f in [busybox, *map(str, modules), *files]:
        st = os.stat(f)
        digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    suffix = ".cpio.gz" if compress else ".cpio"
    out = cache_dir / f"initramfs-{version}-{digest.hexdigest()[:16]}{suffix}"
    if out.exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One builder at a time (e.g. pytest-xdist workers); the others reuse its result.
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            _write_initramfs(out, init, modules, files, busybox, compress)
            _prune(cache_dir, f"initramfs-*{suffix}", keep=out)
    return out


def _write_initramfs(
    out: Path, init: str, modules: list[Path], files: list[str], busybox: str, compress: bool
) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        # gzip level 1: the guest inflates it as fast as level 9's, the host writes it faster.
        with (
            gzip.GzipFile(tmp, "wb", compresslevel=1, mtime=0) if compress else open(tmp, "wb")
        ) as stream:
            cpio = _Cpio(stream)  # type: ignore[arg-type]  # both are binary writers
            tree = _Tree(cpio)
            for d in ("dev", "proc", "sys", "tmp", "root", "etc", "mnt"):
                cpio.directory(d)
            cpio.chardev("dev/console", 5, 1)
            cpio.chardev("dev/null", 1, 3)
            cpio.file("init", init.encode(), 0o755)
            for mod in modules:
                tree.host_file(str(mod), _module_bytes(mod), _plain_ko_name(mod))
            for f in files:
                tree.host_file(f)
            # Applets as symlinks at build time, so /init needs no `busybox --install`;
            # after the real binaries, which win over a same-named applet.
            bb = tree.host_file(busybox)
            applets = subprocess.run(
                [busybox, "--list"], check=True, capture_output=True, text=True
            ).stdout.split()
            for d in ("/bin", "/sbin", "/usr/bin", "/usr/sbin"):
                tree.host_dir(d)
            bindir = tree.host_dir("/bin")
            for applet in applets:
                if f"{bindir}/{applet}" not in cpio.names:
                    cpio.symlink(f"{bindir}/{applet}", bb)
            cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
            cpio.file("etc/group", b"root:x:0:\n")
            cpio.trailer()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# --- running guests --------------------------------------------------------------------------


@dataclass
class GuestResult:
    rc: int | None  # the script's exit code; None if the end marker never appeared
    output: str  # what the script printed (between the markers)
    console: str  # the whole serial console log
    qemu_returncode: int | None = None  # None if QEMU was killed by us
    qemu_stderr: str = ""
    timed_out: bool = False
    boot_seconds: float | None = None  # QEMU start to begin marker
    elapsed: float = 0.0

    def describe(self) -> str:
        """A summary for assertion messages."""
        return (
            f"rc={self.rc} qemu_rc={self.qemu_returncode} timed_out={self.timed_out}\n"
            f"--- qemu stderr ---\n{self.qemu_stderr}\n--- console ---\n{self.console}"
        )


def _normalize(raw: bytes) -> str:
    # The guest tty turns \n into \r\n.
    return raw.decode(errors="replace").replace("\r\n", "\n").replace("\r", "")


def parse_console(console: str) -> tuple[int | None, str]:
    """(script rc, script output) from a normalized console log."""
    begin = console.find(BEGIN_MARKER + "\n")
    if begin < 0:
        return None, ""
    start = begin + len(BEGIN_MARKER) + 1
    end = _END_RE.search(console, start)
    if end is None:
        return None, console[start:]
    output = console[start:end.start()]
    # /init prints one newline before the end marker.
    return int(end.group(1)), output[:-1] if output.endswith("\n") else output


def guest_command(
    kernel: Path,
    initrd: Path,
    script_file: Path,
    qemu_args: Sequence[str],
    *,
    mem_mb: int = 512,
    smp: int = 1,
    append: str = "",
    hotplug: str = "",
) -> list[str]:
    """hotplug: QEMU's -m options for memory hotplug, e.g. "slots=16,maxmem=8G"."""
    cmdline = "console=ttyS0 quiet panic=-1 " + append
    return [
        qemu_binary(),
        "-accel", "tcg",
        # vhost-user needs guest RAM the back-end can map: a shared memfd.
        "-machine", "q35,memory-backend=mem",
        "-object", f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on",
        "-m", f"{mem_mb}M" + (f",{hotplug}" if hotplug else ""),
        "-smp", str(smp),
        "-nographic",
        "-no-reboot",
        "-nic", "none",  # no default NIC (and so no user-mode network)
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", cmdline.strip(),
        "-fw_cfg", f"name={FW_CFG_NAME},file={script_file}",
        *qemu_args,
    ]


class Guest:
    """A running QEMU guest; read its console while it runs, then take its :meth:`result`."""

    def __init__(self, cmd: list[str], workdir: Path, timeout: float) -> None:
        self.cmd = cmd
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self._workdir = workdir
        self._cond = threading.Condition()
        self._out = bytearray()
        self._err = bytearray()
        self._boot_seconds: float | None = None
        self._killed = False
        # stdin from /dev/null: -nographic would otherwise put a terminal into raw mode.
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        except OSError:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self._finalizer = weakref.finalize(self, _cleanup, self.proc, workdir)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self, stream: IO[bytes], buf: bytearray) -> None:
        fd = stream.fileno()
        while chunk := os.read(fd, 65536):
            with self._cond:
                buf += chunk
                if self._boot_seconds is None and buf is self._out and BEGIN_MARKER.encode() in buf:
                    self._boot_seconds = time.monotonic() - self.started
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def console(self) -> str:
        with self._cond:
            return _normalize(bytes(self._out))

    def wait_for(self, text: str, timeout: float) -> bool:
        """Wait until `text` appears on the console; False on timeout or if QEMU exited."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if text in _normalize(bytes(self._out)):
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or not self._readers[0].is_alive():
                    return False
                self._cond.wait(min(left, 0.5))

    def wait_started(self, timeout: float = 60) -> bool:
        """Wait until the guest's script has started."""
        return self.wait_for(BEGIN_MARKER + "\n", timeout)

    def kill(self) -> None:
        """SIGKILL our QEMU (only the process we started)."""
        if self.proc.poll() is None:
            self._killed = True
            self.proc.kill()
        self.proc.wait()

    def result(self, timeout: float | None = None) -> GuestResult:
        """Wait for QEMU to exit (until the start deadline, or `timeout`), kill it if late."""
        left = self.deadline - time.monotonic() if timeout is None else timeout
        timed_out = False
        try:
            self.proc.wait(timeout=max(left, 0))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
        for t in self._readers:
            t.join(timeout=10)
        self._finalizer()
        console = self.console
        rc, output = parse_console(console)
        return GuestResult(
            rc=rc,
            output=output,
            console=console,
            qemu_returncode=None if self._killed else self.proc.returncode,
            qemu_stderr=_normalize(bytes(self._err)),
            timed_out=timed_out,
            boot_seconds=self._boot_seconds,
            elapsed=time.monotonic() - self.started,
        )

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._finalizer()


def _cleanup(proc: subprocess.Popen[bytes], workdir: Path) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)


def start_guest(
    script: str,
    qemu_args: Sequence[str] = (),
    *,
    mem_mb: int = 512,
    timeout: float = 120,
    cache_dir: Path | None = None,
    smp: int = 1,
    append: str = "",
    hotplug: str = "",
) -> Guest:
    """Boot a guest that runs `script` (busybox sh) and return without waiting for it.

    `qemu_args` attach the devices, e.g. ``["-chardev", "socket,id=c0,path=SOCK",
    "-device", "vhost-user-blk-pci,chardev=c0,num-queues=2"]``.  `timeout` counts from now
    and bounds :meth:`Guest.result`.  `append` adds kernel command-line options.
    """
    initrd = build_initramfs(cache_dir)
    workdir = Path(tempfile.mkdtemp(prefix="vhostd-guest-"))
    script_file = workdir / "script.sh"
    script_file.write_text(script)
    cmd = guest_command(
        guest_kernel(cache_dir), initrd, script_file, qemu_args, mem_mb=mem_mb, smp=smp, append=append,
        hotplug=hotplug,
    )
    return Guest(cmd, workdir, timeout)


def vhost_user_blk_args(
    socket: Path | str, *, num_queues: int = 1, chardev_id: str = "vub0", reconnect: int | None = None,
    packed: bool = False,
) -> list[str]:
    """QEMU arguments for a vhost-user-blk-pci device (the guest sees /dev/vda) on `socket`.

    QEMU connects as the client, so the back-end must already listen unless `reconnect`
    (seconds; QEMU 7.2 takes no reconnect-ms) is given.  `packed`: packed virtqueues.
    """
    chardev = f"socket,id={chardev_id},path={socket}"
    if reconnect is not None:
        chardev += f",reconnect={reconnect}"
    return [
        "-chardev", chardev,
        "-device", f"vhost-user-blk-pci,chardev={chardev_id},num-queues={num_queues}"
                   + (",packed=on" if packed else ""),
    ]


def run_guest(
    script: str,
    qemu_args: Sequence[str] = (),
    *,
    mem_mb: int = 512,
    timeout: float = 120,
    cache_dir: Path | None = None,
    smp: int = 1,
    append: str = "",
) -> GuestResult:
    """Boot a guest, run `script` in it and return its result (QEMU is killed at `timeout`)."""
    guest = start_guest(
        script, qemu_args, mem_mb=mem_mb, timeout=timeout, cache_dir=cache_dir, smp=smp, append=append
    )
    return guest.result()


__all__ = [
    "BEGIN_MARKER",
    "END_MARKER",
    "FW_CFG_NAME",
    "Guest",
    "GuestError",
    "GuestResult",
    "build_initramfs",
    "default_cache_dir",
    "guest_command",
    "guest_kernel",
    "kernel_path",
    "kernel_version",
    "parse_console",
    "run_guest",
    "start_guest",
    "unavailable_reason",
    "vhost_user_blk_args",
]
