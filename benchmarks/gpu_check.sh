#!/usr/bin/env bash
# One GPU machine, one call: install, CUDA conformance (torch:cuda, cupy, jax), GPU tests, the benchmarks.
# Usage (on a CUDA machine, from the repo root): bash benchmarks/gpu_check.sh OUT_DIR [bench args...]
# Pure-Python wheels the machine lacks may be put in .whl/ beforehand.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [bench args]}; shift
mkdir -p "$out"
source "$(dirname "$0")/device_setup.sh"
echo "== conformance on torch:cuda, cupy and jax (GPU)"
python3 -m adalora_core.conformance --backends torch:cuda,cupy,jax:cuda --dtypes float32,float64 \
  --json "$out/conformance_cuda.json" 2>&1 | tee "$out/conformance_cuda.txt" | tail -12
echo "== GPU tests"
python3 -m pytest -q -p no:cacheprovider tests/test_torch_device.py tests/test_torch_fast_path.py tests/test_peft_parity.py \
  2>&1 | tail -5 | tee "$out/pytest_gpu.txt"
echo "== step benchmark"
python3 benchmarks/bench_gpu_step.py --json "$out/bench_gpu_step.json" "$@" 2>&1 | tee "$out/bench_gpu_step.txt"
echo "== the core allocator on torch, CuPy and JAX arrays on the same GPU"
for shape in llama7b bert; do
  python3 benchmarks/bench_allocator_backends.py --backends torch:cuda,cupy,jax:cuda --shape "$shape"
done 2>&1 | tee "$out/bench_allocator_backends.txt"
