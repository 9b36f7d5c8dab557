"""Benchmark-only build: the kernels and the timing loops of ``bench.c`` as a
cffi module, compiled on first use. Never part of the installed package.

``load()`` returns ``(ffi, lib)``: ``lib.adl_bench_*`` (``bench.h``) and the
kernel C API (``adalora_native.h``, so ``lib.adl_select_isa`` picks the path
the timings use). The module is cached in the temp directory under a name
derived from its sources, so a changed kernel is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from typing import Any

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))


def _native_build() -> Any:
    """native/build.py (sources, flags, header parsing), loaded by path."""
    spec = importlib.util.spec_from_file_location("adalora_native_build", os.path.join(_HERE, "..", "build.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load() -> tuple[Any, Any]:
    nb = _native_build()
    bench_h = os.path.join(_HERE, "bench.h")
    sources = [os.path.abspath(p) for p in nb.KERNEL_SOURCES] + [os.path.join(_HERE, "bench.c")]
    inputs = sources + [os.path.abspath(p) for p in (nb.HEADER, *nb.INTERNAL_HEADERS)] + [bench_h]
    digest = hashlib.sha256()
    for path in inputs:
        with open(path, "rb") as f:
            digest.update(f.read())
    name = f"_adalora_bench_{digest.hexdigest()[:16]}"
    tmp = os.path.join(tempfile.gettempdir(), "adalora_bench")
    built = [f for f in os.listdir(tmp) if f.startswith(name + ".") and f.endswith((".so", ".pyd"))] \
        if os.path.isdir(tmp) else []
    if built:
        path = os.path.join(tmp, built[0])
    else:
        ffi = FFI()
        ffi.cdef(nb.cdef_from_header(os.path.abspath(nb.HEADER)) + nb.cdef_from_header(bench_h))
        ffi.set_source(name, '#include "adalora_native.h"\n#include "bench.h"\n', sources=sources,
                       include_dirs=[os.path.abspath(p) for p in nb.INCLUDE_DIRS] + [_HERE],
                       extra_compile_args=nb.EXTRA_COMPILE_ARGS)
        path = ffi.compile(tmpdir=tmp)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ffi, mod.lib
