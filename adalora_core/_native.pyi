"""Types of the cffi extension that setup.py builds from native/ (``native/build.py``)."""

from typing import Any

ffi: Any  # cffi's FFI object: the kernels' C declarations
lib: Any  # the C functions of native/include/adalora_native.h
