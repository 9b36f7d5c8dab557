#!/usr/bin/env bash
# Two GPUs, one call: DDP and FSDP2 through NCCL (step time per rank, mask agreement) next to one GPU.
# Usage (on a 2-GPU CUDA machine, from the repo root): bash benchmarks/nccl_check.sh OUT_DIR [--blocks N]
set -uo pipefail
out=${1:?usage: nccl_check.sh OUT_DIR [bench args]}; shift
mkdir -p "$out"
source "$(dirname "$0")/device_setup.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
{ for mode in ddp fsdp; do
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --mode "$mode" "$@" 2>&1 | grep -v "^W[0-9]"
  done
  python3 benchmarks/bench_distributed.py --mode single "$@"
} | tee "$out/bench_distributed.txt"
