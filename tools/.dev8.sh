export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
TRITONEP_TEST_SHARED_GPU=1 TRITONEP_TEST_RANKS=2 timeout 200 python3 -m pytest -x -q -s tests/gpu -k "pp_send_recv or agrs" > $OUT/gpu_pp_agrs_2.log 2>&1; echo "2-rank pp/agrs tests rc=$?"
grep -E "passed|failed|Error|assert" $OUT/gpu_pp_agrs_2.log | tail -8 | cut -c1-400
timeout 120 python3 tools/.probe_pp.py > $OUT/probe_pp.log 2>&1; echo "probe rc=$?"
grep -vE "^W1|OMP" $OUT/probe_pp.log | tail -10
(cd benchmarks && timeout 150 python3 bench_pp.py --sizes-mb 1 16 256 --iters 50 --out $OUT/pp_1rank.json > $OUT/bench_pp.log 2>&1); echo "bench rc=$?"
grep -vE "^W1|OMP|UserWarning|_warn_once" $OUT/bench_pp.log | tail -8 | cut -c1-400
