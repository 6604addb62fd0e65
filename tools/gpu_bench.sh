#!/usr/bin/env bash
# One device call: GPU tests, then the dispatch/combine benchmark on every GPU. Logs under $OUT.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp}
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 -m pytest -x -q -s tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|error|Error" | tail -5
torchrun --nproc_per_node="$N" benchmarks/bench_ep.py --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log" | tail -20
