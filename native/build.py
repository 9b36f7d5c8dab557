"""cffi builder for ``adalora_core._native`` (API mode, out of line).

``setup.py`` names it in ``cffi_modules``, so it is compiled at install time
(``pip install .`` or ``pip install -e .``). To build by hand from the repo
root: ``python native/build.py`` (writes the module into ``adalora_core/``).

The declarations given to cffi are read from ``include/adalora_native.h``,
so the header is the single description of the C API. The same shared
library holds ``adalora_core._native_ops`` (``src/pyops.c``): the ops'
Python entry points, which use NumPy's C API, hence NumPy's headers here.
The AVX2 code is compiled with ``__attribute__((target("avx2,fma")))`` per
function, never a global ``-mavx2``: the same binary runs on any x86-64 CPU
and dispatch.c picks the path at load time.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig

import numpy
from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(*parts: str) -> str:
    """A path under native/, relative to the working directory when possible
    (setuptools prefers relative source paths)."""
    path = os.path.join(_HERE, *parts)
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path


KERNEL_SOURCES = [_rel("src", name) for name in ("scalar.c", "avx2.c", "neon.c", "dispatch.c")]
HEADER = _rel("include", "adalora_native.h")
INTERNAL_HEADERS = [_rel("src", "kernels.h"), _rel("src", "impl_common.h")]
INCLUDE_DIRS = [_rel("include"), _rel("src")]

if sys.platform == "win32":
    EXTRA_COMPILE_ARGS: list[str] = ["/O2"]
else:
    EXTRA_COMPILE_ARGS = ["-O3", "-std=gnu11", "-ffp-contract=off"]


def cdef_from_header(path: str) -> str:
    """The header's declarations in the subset of C that ``ffi.cdef`` reads:
    comments, include guards, ``#include`` and ``extern "C"`` removed; integer
    ``#define`` constants kept."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)
    lines = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            m = re.fullmatch(r"#define\s+(ADL_\w+)\s+\(?(-?\d+)\)?", s)
            if m:
                lines.append(f"#define {m.group(1)} {m.group(2)}")
            continue
        if s in ('extern "C" {', "}"):
            continue
        lines.append(line)
    return "\n".join(lines)


def build_info() -> str:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    flags = " ".join(EXTRA_COMPILE_ARGS)
    return f"{cc} {flags}; avx2.c per-function target(avx2,fma)".replace('"', "'")


ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header(os.path.join(_HERE, "include", "adalora_native.h")))
ffibuilder.set_source(
    "adalora_core._native",
    '#include "adalora_native.h"\n',
    sources=[*KERNEL_SOURCES, _rel("src", "pyops.c")],
    include_dirs=[*INCLUDE_DIRS, numpy.get_include()],
    define_macros=[("ADL_BUILD_INFO", '"' + build_info() + '"')],
    extra_compile_args=EXTRA_COMPILE_ARGS,
    depends=[HEADER, *INTERNAL_HEADERS, _rel("build.py")],  # rebuild when these change
    py_limited_api=False,  # pyops.c uses NumPy's C API, which the stable ABI does not cover
    optional=True,  # a failed compile warns; the package falls back to numpy
)

if __name__ == "__main__":
    root = os.path.dirname(_HERE)
    os.chdir(root)
    ffibuilder.compile(tmpdir=root, verbose=True)
