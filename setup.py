"""Build hook for the optional C extension ``adalora_core._native``.

Everything else about the package lives in pyproject.toml. This file only adds
``cffi_modules`` (native/build.py) and makes the extension optional: when no
working C compiler is present (or ``ADALORA_NATIVE_BUILD=0``), the build
prints why, and the package installs and runs on the pure ``numpy`` backend;
``adalora_core.native_info()`` then reports that the extension is not built.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
BUILDER = os.path.join("native", "build.py")


def _warn(exc: BaseException) -> None:
    bar = "*" * 72
    sys.stderr.write(
        f"\n{bar}\nadalora-core: the C extension adalora_core._native was not built:\n"
        f"  {type(exc).__name__}: {exc}\n"
        "The package still works on the pure 'numpy' backend. Install a C compiler\n"
        "and reinstall to get the 'native' backend.\n"
        f"{bar}\n\n"
    )


class optional_build_ext(build_ext):
    """build_ext that never fails the install: a failed compile only warns."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 (no compiler, bad toolchain, missing headers)
            _warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            _warn(exc)


kwargs = {"cmdclass": {"build_ext": optional_build_ext}}
if not os.path.exists(os.path.join(HERE, BUILDER)):
    _warn(FileNotFoundError(f"{BUILDER} is missing from this source tree"))
elif os.environ.get("ADALORA_NATIVE_BUILD", "1").strip() != "0":
    try:  # build requirements (pyproject.toml); absent only in odd setups
        import cffi  # noqa: F401
        import numpy  # noqa: F401  (native/src/pyops.c uses NumPy's C API)
    except ImportError as exc:
        _warn(exc)
    else:
        kwargs["cffi_modules"] = [f"{BUILDER}:ffibuilder"]

setup(**kwargs)
