"""cffi build script for the vhostd data plane (API mode, out-of-line).

setuptools runs this at package build time (``cffi_modules`` in
pyproject.toml / setup.py); nothing is compiled at import time.
"""

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["mem.c", "vring.c", "vring_packed.c", "iov.c", "log.c", "blk.c", "blk_uring.c", "net.c", "net_ctrl.c", "sched.c", "sandbox.c", "qos.c"]
CFLAGS = ["-std=c11", "-D_GNU_SOURCE", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"]
# The test suite's build (./dev setup) compiles in hooks that break things on
# purpose, to show that the tests catch it (e.g. a dirty log that drops
# writes); a package build never has them.
if os.environ.get("VHOSTD_TEST_HOOKS") == "1":
    CFLAGS.append("-DVHD_TEST_HOOKS")

ffibuilder = FFI()
ffibuilder.cdef(
    "struct iovec { void *iov_base; size_t iov_len; };\n"
    + (HERE / "vhd_api.h").read_text()
)
ffibuilder.set_source(
    "vhostd._native",
    '#include "vhd.h"\n',
    sources=[str((HERE / s).relative_to(HERE.parent)) for s in SOURCES],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=CFLAGS,
    libraries=["uring", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
