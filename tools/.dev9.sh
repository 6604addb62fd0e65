export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
TRITONEP_TEST_SHARED_GPU=1 TRITONEP_TEST_RANKS=2 timeout 240 python3 -m pytest -x -q -s tests/gpu -k "pp_send_recv or agrs or engram" > $OUT/gpu_zero_sm_2.log 2>&1; echo "2-rank pp/agrs/engram tests rc=$?"
grep -E "passed|failed|Error|assert" $OUT/gpu_zero_sm_2.log | tail -8 | cut -c1-400
(cd benchmarks && timeout 150 python3 bench_pp.py --sizes-mb 1 16 64 256 --iters 50 --profile --gemm --out $OUT/pp_1rank.json > $OUT/bench_pp.log 2>&1); echo "bench pp rc=$?"
grep -vE "^W1|OMP|UserWarning|_warn_once" $OUT/bench_pp.log | tail -10 | cut -c1-400
(cd benchmarks && timeout 150 python3 bench_engram.py --out $OUT/engram_1rank.json > $OUT/bench_engram.log 2>&1); echo "bench engram rc=$?"
grep -vE "^W1|OMP" $OUT/bench_engram.log | tail -6 | cut -c1-300
