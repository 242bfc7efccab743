"""The Debian package (debian/, `./dev deb`) and Debian's dependency versions.

- The package builds from a clean copy of the checkout with the README's
  command, and lintian reports no error (and nothing the README does not
  explain).
- What it ships: /usr/bin programs, units and QEMU descriptors naming them,
  the conffile, the sysusers.d file, the examples, man pages, the native
  module for Debian's python3; its Depends floors are pyproject.toml's.
- One version: vhostd.__version__ = `vhostd --version` = the changelog's,
  and debian/rules refuses a changelog that disagrees.
- The test suite (all but the QEMU guest, DPDK, fuzzing, typing and bench
  tests) passes against Debian 12's own python3-trio, python3-cffi,
  python3-click, python3-pyroute2 and python3-prometheus-client: a venv over
  /usr/bin/python3 with --system-site-packages, vhostd installed with
  --no-deps --no-build-isolation (so built with Debian's cffi and setuptools).

tests/test_systemd_nspawn.py installs the package into a Debian 12 rootfs
under systemd and checks it there, removal and purge included."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import debpkg
import vhostd
from unavailable import missing

ROOT = Path(__file__).resolve().parent.parent
# pyproject.toml's dependency -> the Debian package that provides it.
DEBIAN_NAMES = {"trio": "python3-trio", "cffi": "python3-cffi", "click": "python3-click",
                "pyroute2": "python3-pyroute2", "prometheus-client": "python3-prometheus-client"}
# Not run against Debian's packages: the guests (QEMU, minutes each), DPDK,
# fuzzing (clang), typing (mypy), the bench harness, the Debian package
# itself, and the native scheduling and timing tests, which use no
# dependency and take a while.
# Not the dependencies' business: packaging itself, typing, fuzzing, DPDK and rate measurements.
NOT_UNDER_DEBIAN_DEPS = ("test_deb.py", "test_typing.py", "test_fuzz.py", "test_dpdk_net.py",
                         "test_bench_blkfe.py", "test_workers.py", "test_churn.py", "test_scaling.py",
                         "test_qos_daemon.py")


def _floors() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep)
        assert m, f"pyproject.toml: {dep}: every dependency has a floor (>=) and nothing else"
        floors[m.group(1)] = m.group(2)
    return floors


def _contents(deb: Path) -> list[str]:
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], check=True, capture_output=True, text=True).stdout
    return [line.split(None, 5)[5].split(" -> ")[0].removeprefix(".") for line in out.splitlines()]


def _extract(deb: Path, dest: Path) -> Path:
    subprocess.run(["dpkg-deb", "-R", str(deb), str(dest)], check=True)
    return dest


# --- the package -----------------------------------------------------------------------------

def test_package_builds_from_a_clean_copy_and_lintian_reports_no_error() -> None:
    b = debpkg.built()
    assert b.deb.name == f"vhostd_{vhostd.__version__}_{_arch()}.deb"
    tags = [line for line in b.lintian.splitlines() if line.strip()]
    print("\nlintian:\n" + ("\n".join(tags) or "(nothing)"))
    assert not [t for t in tags if t.startswith("E: ")], b.lintian
    # Whatever lintian still reports is explained in the README's Debian section.
    section = _readme_debian_section()
    for t in tags:
        tag = t.split()[2]
        assert f"`{tag}`" in section, f"README.md (Install on Debian) does not explain lintian's {t}"


def _arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True,
                          text=True).stdout.strip()


def _readme_debian_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Install on Debian")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_package_contents_units_descriptors_and_conffile(tmp_path: Path) -> None:
    b = debpkg.built()
    files = set(_contents(b.deb))
    for prog in ("vhostd", "vhostd-blk", "vhostd-net"):
        assert f"/usr/bin/{prog}" in files
        assert f"/usr/share/man/man1/{prog}.1.gz" in files
    units = {"vhostd.service", "vhostd@.socket", "vhostd-blk@.service", "vhostd-blk@.socket",
             "vhostd-net@.service", "vhostd-net@.socket"}
    assert {f for f in files if f.startswith("/lib/systemd/system/")} == \
        {f"/lib/systemd/system/{u}" for u in units} | {"/lib/systemd/system/"}
    for f in ("/usr/lib/sysusers.d/vhostd.conf", "/etc/vhostd/vhostd.toml",
              "/usr/share/doc/vhostd/examples/vhostd.toml",
              "/usr/share/doc/vhostd/examples/vhostd-blk.env.example",
              "/usr/share/doc/vhostd/examples/vhostd-net.env.example",
              "/usr/share/qemu/vhost-user/50-vhostd-blk.json", "/usr/share/qemu/vhost-user/50-vhostd-net.json",
              "/usr/lib/python3/dist-packages/vhostd/cli.py"):
        assert f in files, f
    assert [f for f in files if re.fullmatch(r"/usr/lib/python3/dist-packages/vhostd/_native\..*so", f)]
    assert not [f for f in files if f.startswith("/usr/local")]

    x = _extract(b.deb, tmp_path / "x")
    assert (x / "DEBIAN/conffiles").read_text().split() == ["/etc/vhostd/vhostd.toml"]
    # Units and descriptors name the package's programs, and are otherwise the shipped ones.
    for u in units:
        text = (x / "lib/systemd/system" / u).read_text()
        assert "/usr/local" not in text
        shipped = (ROOT / "systemd" / u).read_text().replace("/usr/local/bin/", "/usr/bin/")
        assert text == "".join(line for line in shipped.splitlines(keepends=True)
                               if not line.startswith("# vhostd is installed with pip"))
        for line in text.splitlines():
            if line.startswith(("ExecStart=", "ExecStartPre=", "ExecReload=")):
                assert line.split("=", 1)[1].startswith("/usr/bin/vhostd "), line
    for kind in ("blk", "net"):
        desc = json.loads((x / f"usr/share/qemu/vhost-user/50-vhostd-{kind}.json").read_text())
        assert desc["binary"] == f"/usr/bin/vhostd-{kind}"
        assert (x / desc["binary"].lstrip("/")).exists()
    assert (x / "usr/lib/sysusers.d/vhostd.conf").read_text() == (ROOT / "systemd/vhostd.sysusers").read_text()
    assert (x / "usr/share/doc/vhostd/examples/vhostd.toml").read_text() == \
        (ROOT / "systemd/vhostd.toml").read_text()
    # The conffile serves no device until edited.
    conf = tomllib.loads((x / "etc/vhostd/vhostd.toml").read_text())
    assert "devices" not in conf and conf["daemon"]["control_socket"] == "/run/vhostd/control.sock"
    # Maintainer scripts: the group before vhostd.service starts; template instances stopped.
    postinst = (x / "DEBIAN/postinst").read_text()
    assert postinst.index("systemd-sysusers") < postinst.index("deb-systemd-invoke $_dh_action 'vhostd.service'")
    assert "'vhostd-blk@*.service'" in (x / "DEBIAN/prerm").read_text()


def test_depends_floors_are_pyprojects() -> None:
    b = debpkg.built()
    depends = subprocess.run(["dpkg-deb", "-f", str(b.deb), "Depends"], check=True, capture_output=True,
                             text=True).stdout
    deb = dict(re.findall(r"(python3-[a-z0-9-]+) \(>= ([0-9.]+)\)", depends))
    control = (ROOT / "debian/control").read_text()
    build = dict(re.findall(r"(python3-[a-z0-9-]+) \(>= ([0-9.]+)\)", control.split("\nPackage:")[0]))
    floors = _floors()
    assert set(floors) == set(DEBIAN_NAMES)
    for name, floor in floors.items():
        pkg = DEBIAN_NAMES[name]
        if name == "cffi":        # the module needs the backend only: dh_python3's cffi API range
            assert "python3-cffi-backend-api-min" in depends and build[pkg] == floor
        else:
            assert deb[pkg] == floor and build[pkg] == floor, (name, floor, depends)
    assert re.search(r"liburing2 \(>= [0-9.]+\)", depends), depends


def test_one_version_everywhere(tmp_path: Path) -> None:
    changelog = subprocess.run(["dpkg-parsechangelog", "-l", str(ROOT / "debian/changelog"), "-S", "Version"],
                               check=True, capture_output=True, text=True).stdout.strip()
    assert changelog == vhostd.__version__         # a native package: no Debian revision
    out = subprocess.run([sys.executable, "-m", "vhostd", "--version"], check=True, capture_output=True,
                         text=True).stdout
    assert out == f"vhostd {vhostd.__version__}\n"
    b = debpkg.built()
    assert subprocess.run(["dpkg-deb", "-f", str(b.deb), "Version"], check=True, capture_output=True,
                          text=True).stdout.strip() == vhostd.__version__
    # debian/rules refuses a changelog that names another version.
    shutil.copytree(ROOT / "debian", tmp_path / "debian", symlinks=True)
    (tmp_path / "vhostd").mkdir()
    shutil.copy(ROOT / "vhostd/__init__.py", tmp_path / "vhostd/__init__.py")
    log = tmp_path / "debian/changelog"
    log.write_text(log.read_text().replace(f"vhostd ({vhostd.__version__})", "vhostd (9.9.9)", 1))
    res = subprocess.run(["make", "-f", "debian/rules", "execute_before_dh_auto_configure"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert f"debian/changelog says 9.9.9, vhostd/__init__.py says {vhostd.__version__}" in res.stderr


# --- the suite against Debian's python3 packages ---------------------------------------------

def _dpkg_version(pkg: str) -> str | None:
    res = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", pkg], capture_output=True, text=True)
    status, _, version = res.stdout.partition("\t")
    return version if res.returncode == 0 and status == "install ok installed" else None


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f, follow_symlinks=False)


def test_suite_passes_against_debians_python3_packages(tmp_path: Path) -> None:
    python = Path("/usr/bin/python3")
    versions = {pkg: _dpkg_version(pkg) for pkg in (*DEBIAN_NAMES.values(), "python3-venv")}
    if not python.exists() or None in versions.values():
        missing(f"Debian's python3 packages: apt-get install {' '.join(versions)} (./dev setup does)")
    # The floors are the versions tested here: Debian 12's.
    for name, floor in _floors().items():
        upstream = re.sub(r"^\d+:", "", versions[DEBIAN_NAMES[name]] or "").split("-")[0]
        assert upstream == floor or upstream.startswith(floor + "."), (name, floor, upstream)

    venv, src = tmp_path / "venv", tmp_path / "src"
    _copy_tree(src)
    subprocess.run([str(python), "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # Built with Debian's cffi and setuptools (no isolation), with the test hooks as ./dev setup.
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", str(src)], check=True, timeout=600,
                   env={**env, "VHOSTD_TEST_HOOKS": "1"})
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    subprocess.run([*pip, *(t for t in test_extra if not t.startswith("mypy"))], check=True, timeout=600, env=env)
    shutil.rmtree(src / "vhostd")                 # the tests import the installed vhostd
    probe = subprocess.run([str(venv / "bin/python"), "-c", """
import importlib, importlib.metadata as md, json
mods = {"trio": "trio", "cffi": "_cffi_backend", "click": "click", "pyroute2": "pyroute2",
        "prometheus-client": "prometheus_client", "attrs": "attr", "outcome": "outcome",
        "sniffio": "sniffio", "sortedcontainers": "sortedcontainers", "idna": "idna"}
print(json.dumps({d: [md.version(d), importlib.import_module(m).__file__] for d, m in mods.items()}))
"""], check=True, capture_output=True, text=True, cwd=tmp_path, env=env)
    seen = json.loads(probe.stdout)
    for dist, (version, path) in seen.items():
        assert path.startswith("/usr/lib/python3/dist-packages/"), (dist, path)   # Debian's, not PyPI's
    for name, pkg in DEBIAN_NAMES.items():
        installed = versions[pkg]
        assert installed is not None and installed.startswith(seen[name][0]), (name, seen[name], installed)
    print("\nDebian's packages under test: "
          + ", ".join(f"{pkg} {versions[pkg]}" for pkg in DEBIAN_NAMES.values()))

    tests = sorted(p.name for p in (src / "tests").glob("test_*.py") if p.name not in NOT_UNDER_DEBIAN_DEPS)
    res = subprocess.run([str(venv / "bin/python"), "-m", "pytest", "-p", "no:cacheprovider", "-q",
                          "-m", "not guest", *(f"tests/{t}" for t in tests)],
                         cwd=src, capture_output=True, text=True, timeout=1800, env=env)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    print(f"under Debian's packages: {summary}")
    assert res.returncode == 0, res.stdout[-20000:] + res.stderr[-5000:]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary, summary
