#!/usr/bin/env bash
# One device call: versions, the GPU tests at DeepSeek-V3 sizes, and the main job on every GPU.
# Usage on the device machine: bash tools/gpu_check.sh  (writes logs under $OUT if set)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1
python3 -m pytest -x -q -s tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | grep -vE "^\s*$" | tail -25
python3 -m tritonep 2>&1 | tee "$OUT/main_job.log"
