"""cffi builder for ``adalora_core._native`` (API mode, out of line).

``setup.py`` names it in ``cffi_modules``, so it is compiled at install time
(``pip install .`` or ``pip install -e .``). To build by hand from the repo
root: ``python native/build.py`` (writes the module into ``adalora_core/``).

The declarations given to cffi are read from ``include/adalora_native.h`` and
``include/adalora_native_py.h``, so the headers are the single description of
the C API. The AVX2 code is compiled
with ``__attribute__((target("avx2,fma")))`` per function, never a global
``-mavx2``: the same binary runs on any x86-64 CPU and dispatch.c picks the
path at load time.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig

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


SOURCES = [
    _rel("src", name)
    for name in ("scalar.c", "avx2.c", "neon.c", "dispatch.c", "bench.c", "pyfast.c")
]
HEADERS = ["adalora_native.h", "adalora_native_py.h"]
INCLUDE_DIRS = [_rel("include"), _rel("src")]
# rebuild when these change; setuptools also ships them in an sdist
DEPENDS = [_rel("include", h) for h in HEADERS] + [
    _rel("src", "kernels.h"),
    _rel("src", "impl_common.h"),
    _rel("build.py"),
]

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


def _build_info() -> str:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    flags = " ".join(EXTRA_COMPILE_ARGS)
    return f"{cc} {flags}; avx2.c per-function target(avx2,fma)".replace('"', "'")


ffibuilder = FFI()
for _header in HEADERS:
    ffibuilder.cdef(cdef_from_header(os.path.join(_HERE, "include", _header)))
ffibuilder.set_source(
    "adalora_core._native",
    "".join(f'#include "{h}"\n' for h in HEADERS),
    sources=SOURCES,
    include_dirs=INCLUDE_DIRS,
    define_macros=[("ADL_BUILD_INFO", '"' + _build_info() + '"')],
    extra_compile_args=EXTRA_COMPILE_ARGS,
    depends=DEPENDS,
    optional=True,  # a failed compile warns; the package falls back to numpy
)

if __name__ == "__main__":
    root = os.path.dirname(_HERE)
    os.chdir(root)
    ffibuilder.compile(tmpdir=root, verbose=True)
