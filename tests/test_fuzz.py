"""The C data plane under libFuzzer with ASan and UBSan (fuzz/).

Builds the targets (``make -C fuzz``), replays the seed corpora and the
known-bug reproducers, and runs each target for VHOSTD_FUZZ_SECONDS
(default 20) from its seeds with a fixed mutation seed (VHOSTD_FUZZ_SEED,
default 1).  A crash, sanitizer report, hang or broken invariant fails the
run; the input is kept in fuzz/build/artifacts/.

Needs clang with libFuzzer (Debian: clang libclang-rt-14-dev) and make:
without them these tests fail under CI and are skipped elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from unavailable import missing

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
BUILD = FUZZ / "build"
TARGETS = ["fuzz_vring_blk", "fuzz_vring_net", "fuzz_vring_packed", "fuzz_mem"]
SECONDS = int(os.environ.get("VHOSTD_FUZZ_SECONDS", "20"))
# A fixed seed keeps the suite repeatable: CI replays the same mutation
# sequence (timing aside) instead of gambling on a new one per run.  Open-
# ended campaigns: VHOSTD_FUZZ_SEED=0 (random) or fuzz/run.sh directly.
SEED = os.environ.get("VHOSTD_FUZZ_SEED", "1")
# A harness that runs but hardly executes anything is broken: every target
# does thousands of executions a second.
MIN_RUNS_PER_SECOND = 200

# Reproducers of open bugs: they must fail with the workaround off (strict)
# until the bug is fixed, then the entry goes (a fixed bug's reproducer
# passes and fails the run as XPASS).  See fuzz/repro/README.md.
KNOWN_BUGS: dict[str, str] = {}   # all reproducers in fuzz/repro/ are fixed bugs now (regressions)
# Bugs in code that was still being written when the reproducer was saved:
# not strict, as the code may change under it.
NOT_STRICT: set[str] = set()


def toolchain_problem() -> str | None:
    if not shutil.which("make"):
        return "make is not installed"
    if not shutil.which("clang"):
        return "clang is not installed (Debian: apt-get install clang libclang-rt-14-dev)"
    probe = subprocess.run(
        ["clang", "-fsanitize=fuzzer,address,undefined", "-x", "c", "-", "-o", "/dev/null"],
        input="#include <stddef.h>\n#include <stdint.h>\n"
              "int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { return 0; }\n",
        capture_output=True, text=True)
    if probe.returncode != 0:
        return f"clang cannot link libFuzzer (Debian: apt-get install libclang-rt-14-dev):\n{probe.stderr}"
    return None


@pytest.fixture(scope="module")
def built() -> Path:
    problem = toolchain_problem()
    if problem:
        missing(problem)
    r = subprocess.run(["make", "-C", str(FUZZ), "-s", "-j2", "all"], capture_output=True, text=True)
    assert r.returncode == 0, f"building the fuzzers failed:\n{r.stdout}\n{r.stderr}"
    return BUILD


def run_input(target: str, path: Path, strict: bool) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VHD_FUZZ_STRICT="1" if strict else "0")
    return subprocess.run([str(BUILD / target), "-timeout=20", str(path)], capture_output=True, text=True,
                          env=env, timeout=120)


def failure(out: str) -> str:
    lines = [ln for ln in out.splitlines()
             if re.search(r"==FUZZ INVARIANT==|ERROR: |runtime error|SUMMARY", ln)]
    return "\n".join(lines) or out[-3000:]


def test_seed_corpus_is_current() -> None:
    r = subprocess.run([sys.executable, str(FUZZ / "gen_corpus.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("target", TARGETS)
def test_seeds_pass(built: Path, target: str) -> None:
    """Every seed runs clean with known-bug workarounds off."""
    seeds = sorted((FUZZ / "corpus" / target).iterdir())
    assert seeds
    env = dict(os.environ, VHD_FUZZ_STRICT="1")
    r = subprocess.run([str(built / target), "-timeout=20", *map(str, seeds)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, failure(r.stdout + r.stderr)


def repro_params(known_fail: bool) -> list[object]:
    """(target, path) of every reproducer; known_fail: mark the open bugs xfail."""
    params: list[object] = []
    for target in TARGETS:
        d = FUZZ / "repro" / target
        for path in sorted(d.iterdir()) if d.is_dir() else []:
            key = f"{target}/{path.name}"
            marks = [pytest.mark.xfail(strict=key not in NOT_STRICT, reason=f"KNOWN BUG: {KNOWN_BUGS[key]}")] \
                if key in KNOWN_BUGS and known_fail else []
            params.append(pytest.param(target, path, id=key, marks=marks))
    return params


@pytest.mark.parametrize("target,path", repro_params(known_fail=True))
def test_reproducer(built: Path, target: str, path: Path) -> None:
    """A saved reproducer runs clean (strictly: no known-bug workaround)."""
    r = run_input(target, path, strict=True)
    assert r.returncode == 0, failure(r.stdout + r.stderr)


@pytest.mark.parametrize("target,path", repro_params(known_fail=False))
def test_reproducer_with_workaround(built: Path, target: str, path: Path) -> None:
    """The fuzzers' known-bug workarounds keep the campaign going past them."""
    r = run_input(target, path, strict=False)
    assert r.returncode == 0, failure(r.stdout + r.stderr)


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz(built: Path, target: str) -> None:
    r = subprocess.run([str(FUZZ / "run.sh"), "--no-build", str(SECONDS), target], capture_output=True,
                       text=True, timeout=SECONDS * 3 + 120, env=dict(os.environ, FUZZ_SEED=SEED))
    print(r.stdout, end="")
    m = re.search(rf"^{target}: (\d+) runs in", r.stdout, re.M)
    runs = int(m.group(1)) if m else 0
    log = BUILD / f"{target}.log"
    detail = failure(log.read_text(errors="replace")) if log.exists() else r.stderr
    assert r.returncode == 0, f"{r.stdout}\n{detail}"
    assert runs >= MIN_RUNS_PER_SECOND * SECONDS, f"only {runs} executions in {SECONDS} s:\n{r.stdout}"
