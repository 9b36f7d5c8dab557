#!/usr/bin/env bash
# C kernels: every instruction-set path against the scalar reference and
# double-precision formulas (native/tests/test_kernels.c), three ways:
#   1. native build on this machine (scalar + AVX2 on x86-64)
#   2. AArch64 cross build run under qemu-aarch64 (the NEON path)
#   3. ASan + UBSan build of the native driver
# Installs gcc-aarch64-linux-gnu and qemu-user with apt-get when missing.
# Exits non-zero on the first failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TESTS="$ROOT/native/tests"
JOBS="${JOBS:-2}"

need=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
if ((${#need[@]})); then
    echo "== installing ${need[*]}"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
            echo "error: need ${need[*]} (apt-get install -y ${need[*]}) and am not root" >&2
            exit 1
        fi
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

step() {
    local name="$1"
    shift
    echo "== $name"
    local t0=$SECONDS
    "$@"
    echo "== $name: ok ($((SECONDS - t0)) s)"
}

step "native (scalar, AVX2 where the CPU has it)" make -s -C "$TESTS" -j"$JOBS" check
step "aarch64 under qemu (scalar, NEON)" make -s -C "$TESTS" -j"$JOBS" check-neon
step "ASan + UBSan" make -s -C "$TESTS" -j"$JOBS" check-sanitize
echo "== native kernels: all checks passed"
