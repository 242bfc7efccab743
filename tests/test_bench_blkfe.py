"""blkfe, the C front-end of the blk-backend benchmark (bench/blkfe.c), against real back-ends.

The benchmark's numbers only mean something if its front-end drives a back-end correctly, so
this writes a pattern through two queues, flushes and reads it back through the other queue,
on vhostd and on qemu-storage-daemon (the benchmark's anchor); it also checks the pattern
landed in the image file at the right offsets, that a wrong pattern is caught, and that the
benchmark's --sync timed mode runs.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import vhostd_proc

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import BenchError, Process  # noqa: E402
from bench.blk_backend import BACKENDS, Frontend, Workload, build_blkfe  # noqa: E402
from unavailable import missing  # noqa: E402

IMAGE_SIZE = 32 << 20
SECTOR = 512
GOLDEN = 0x9E3779B97F4A7C15


@pytest.fixture(scope="module")
def blkfe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which(os.environ.get("CC", "cc")) is None:
        missing("no C compiler (cc)")
    try:
        return build_blkfe(tmp_path_factory.mktemp("blkfe"))
    except BenchError as e:
        pytest.fail(str(e))


def run_blkfe(exe: Path, sock: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    r = subprocess.run([str(exe), "--socket", str(sock), *args], capture_output=True, text=True,
                       timeout=60)
    lines = r.stdout.splitlines()
    return r.returncode, (json.loads(lines[-1]) if lines else {}), r.stderr


def verify(exe: Path, sock: Path, *args: str) -> dict[str, Any]:
    rc, doc, err = run_blkfe(exe, sock, "--verify", *args)
    assert rc == 0, f"blkfe --verify exited {rc}: {err}"
    assert (doc["verify"], doc["errors"], doc["mismatched_sectors"]) == ("ok", 0, 0)
    assert doc["bytes_verified"] == IMAGE_SIZE
    return doc


def expected_sector(seed: int, sector: int) -> bytes:
    """blkfe's pattern_word(): every 8-byte word names its sector, its place and the seed."""
    mix = (seed * GOLDEN) & (2**64 - 1)
    return struct.pack("<64Q", *(((sector << 8) | w) ^ mix for w in range(64)))


def test_verify_on_vhostd_two_queues(blkfe: Path, tmp_path: Path) -> None:
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", IMAGE_SIZE)
    with vhostd_proc.blk(tmp_path, image, "--num-queues", "2") as d:
        assert d.socket is not None
        # The benchmark's own path first: --sync handshake, timed random reads on 2 queues.
        fe = Frontend(blkfe, d.socket, Workload("t", "randread", 4096, 16, queues=2), 0.3, "",
                      seed=3, log_path=tmp_path / "fe.log")
        fe.wait_ready()
        fe.go()
        res = fe.result()
        assert fe.close() == 0
        assert res["requests"] > 0 and res["errors"] == 0 and res["p99_us"] >= res["p50_us"] > 0

        doc = verify(blkfe, d.socket, "--queues", "2")
        # Each queue wrote its half, flushed once and read the other half.
        assert doc["requests"] == 2 * IMAGE_SIZE // 4096 + 2
        # Without EVENT_IDX (flags-based suppression) and with 64 KiB requests.
        doc = verify(blkfe, d.socket, "--queues", "2", "--no-event-idx", "--bs", "65536",
                     "--seed", "7")
        assert doc["event_idx"] is False
        # A new connection still reads seed 7's data; seed 8's pattern is not there.
        rc, doc, _ = run_blkfe(blkfe, d.socket, "--check", "--queues", "2", "--seed", "7")
        assert (rc, doc["verify"]) == (0, "ok")
        rc, doc, err = run_blkfe(blkfe, d.socket, "--check", "--seed", "8", "--size-mib", "1")
        assert (rc, doc["verify"], doc["mismatched_sectors"]) == (1, "failed", 2048), err
        assert d.alive()
    # The data are in the file, each sector where it belongs.
    with open(image, "rb") as f:
        for sector in (0, 1, IMAGE_SIZE // SECTOR // 2, IMAGE_SIZE // SECTOR - 1):
            f.seek(sector * SECTOR)
            assert f.read(SECTOR) == expected_sector(7, sector), f"sector {sector}"


def test_verify_on_qemu_storage_daemon_two_queues(blkfe: Path, tmp_path: Path) -> None:
    if shutil.which("qemu-storage-daemon") is None:
        missing("qemu-storage-daemon not installed (qemu-system-common)")
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", IMAGE_SIZE)
    sock = tmp_path / "qsd.sock"
    with Process(BACKENDS["qsd"](image, sock, 2), tmp_path / "qsd.log", socket=sock) as qsd:
        verify(blkfe, sock, "--queues", "2")
        verify(blkfe, sock, "--queues", "2", "--no-event-idx", "--bs", "131072", "--seed", "9")
        assert qsd.proc.poll() is None, qsd.log()


def test_log_dirty_pages_on_vhostd_and_qemu_storage_daemon(blkfe: Path, tmp_path: Path) -> None:
    """blkfe --log (the blk-backend benchmark's `-log` back-ends): LOG_ALL, LOG_SHMFD,
    SET_LOG_BASE with its reply read, used rings logged; the back-end's writes show up as
    pages in blkfe's bitmap, all inside its guest RAM, and the data are still right."""
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", IMAGE_SIZE)
    with vhostd_proc.blk(tmp_path, image, "--num-queues", "2") as d:
        sock = d.listening_socket
        rc, doc, err = run_blkfe(blkfe, sock, "--log", "--queues", "2", "--seconds", "0.5")
        assert rc == 0, err
        # Each sync sees at least the data pages of QD reads in flight, per queue.
        assert doc["log"] is True and doc["log_syncs"] >= 5 and doc["logged_pages"] >= 32, doc
        assert doc["logged_pages_outside_ram"] == 0, doc
        doc = verify(blkfe, sock, "--log", "--queues", "2", "--seed", "5")
        assert doc["logged_pages"] > 0 and doc["logged_pages_outside_ram"] == 0, doc
        assert "dirty page logging on" in d.log()
        assert d.alive()
    if shutil.which("qemu-storage-daemon") is None:
        missing("qemu-storage-daemon not installed (qemu-system-common)")
    qsock = tmp_path / "qsd.sock"
    with Process(BACKENDS["qsd-log"](image, qsock, 2), tmp_path / "qsd.log", socket=qsock) as qsd:
        # libvhost-user answers SET_LOG_BASE with the request's mmap_size, not 0: still fine.
        rc, doc, err = run_blkfe(blkfe, qsock, "--log", "--seconds", "0.5")
        assert rc == 0 and doc["logged_pages"] >= 32 and doc["logged_pages_outside_ram"] == 0, err
        verify(blkfe, qsock, "--log", "--queues", "2", "--seed", "6")
        assert qsd.proc.poll() is None, qsd.log()


def test_regions_and_hot_added_regions_on_vhostd_and_qemu_storage_daemon(blkfe: Path,
                                                                          tmp_path: Path) -> None:
    """blkfe --regions N (the blk-backend benchmark's `-regions` back-ends): guest RAM as N
    memfd regions, buffers round-robin over them, sent with ADD_MEM_REG (CONFIGURE_MEM_SLOTS)
    or SET_MEM_TABLE (N <= 8); and --add-regions-every (`-hotadd`): regions added and removed
    while the I/O runs.  The data stay right and every change is acknowledged."""
    image = vhostd_proc.sparse_image(tmp_path / "disk.img", IMAGE_SIZE)
    hot = ("--regions", "1", "--add-regions-every", "40", "--add-regions-max", "3",
           "--change-window-ms", "10", "--add-region-mib", "8", "--seconds", "0.5")
    with vhostd_proc.blk(tmp_path, image, "--num-queues", "2") as d:
        sock = d.listening_socket
        doc = verify(blkfe, sock, "--regions", "64", "--queues", "2", "--seed", "11")
        assert (doc["regions"], doc["mem_setup"], doc["max_mem_slots"]) == (64, "add_mem_reg", 509)
        rc, doc, err = run_blkfe(blkfe, sock, "--verify", "--regions", "509", "--bs", "65536",
                                 "--size-mib", "4")
        assert (rc, doc["verify"], doc["regions"]) == (0, "ok", 509), err
        doc = verify(blkfe, sock, "--regions", "8", "--set-mem-table", "--seed", "12")
        assert (doc["regions"], doc["mem_setup"]) == (8, "set_mem_table")
        rc, _, err = run_blkfe(blkfe, sock, "--regions", "9", "--set-mem-table")
        assert rc == 2 and "at most 8 regions" in err
        rc, doc, err = run_blkfe(blkfe, sock, *hot)
        assert rc == 0 and doc["errors"] == 0, err
        # 12 ticks: 3 added, 3 removed, 3 added, ...
        assert doc["regions_added"] >= 3 and doc["regions_removed"] >= 1, doc
        assert doc["region_changes"] == doc["regions_added"] + doc["regions_removed"]
        assert doc["add_requests"] > 0 and doc["quiet_requests"] > 0, doc
        assert doc["add_max_us"] >= doc["add_p99_us"] >= doc["add_p50_us"] > 0, doc
        assert "memory region added" in d.log() and "memory region removed" in d.log()
        assert d.alive()
    if shutil.which("qemu-storage-daemon") is None:
        missing("qemu-storage-daemon not installed (qemu-system-common)")
    qsock = tmp_path / "qsd.sock"
    with Process(BACKENDS["qsd"](image, qsock, 2), tmp_path / "qsd.log", socket=qsock) as qsd:
        doc = verify(blkfe, qsock, "--regions", "16", "--queues", "2", "--seed", "13")
        assert doc["mem_setup"] == "add_mem_reg" and doc["max_mem_slots"] >= 16
        verify(blkfe, qsock, "--regions", "4", "--set-mem-table", "--seed", "14")
        # libvhost-user 7.2 has 32 slots: blkfe says so instead of failing later.
        rc, _, err = run_blkfe(blkfe, qsock, "--regions", "509")
        assert rc == 2 and "memory slots" in err
        rc, doc, err = run_blkfe(blkfe, qsock, *hot)
        assert rc == 0 and doc["errors"] == 0 and doc["regions_removed"] >= 1, err
        assert qsd.proc.poll() is None, qsd.log()
