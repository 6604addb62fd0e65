#!/usr/bin/env bash
# One device call on a machine with N GPUs: the GPU tests at N ranks, the benchmark at DeepSeek-V3
# sizes, and the main job. Logs under $OUT. Knobs (environment):
#   TEST_FILTER   pytest -k expression for tests/gpu (default: all). The whole file takes ~9 min at 2
#                 ranks on 2 x H200: split it, e.g. "graph or capture or (symmetric and 24)"
#                 (~3.5 min at 2 ranks, ~4.5 at 4), then "132 or alltoall" (~3.5 min at 2 ranks)
#   TEST_TIMEOUT  seconds for the tests (default 330); BENCH_ARGS extra benchmark arguments,
#                 BENCH_TIMEOUT its seconds (default 150)
#   SKIP          space-separated steps to leave out: tests bench main; PROFILE_ARGS: also run
#                 benchmarks/profile_ep.py with these arguments (e.g. "--num-sms 24")
#   VDEV_ARGS     also run benchmarks/vdev_peer.py (PyTorch's NVSHMEM all-to-all peer) with these
#                 arguments (e.g. "--tokens 4096 8192"); its rows go to $OUT/vdev_N.json (on the H200
#                 machines it only says why it cannot run: no NVSHMEM allocator in their torch)
#   RANKS         ranks of the tests (default: one per GPU); more than the GPUs: they share GPU 0
#                 (TRITONEP_TEST_SHARED_GPU=1, correctness only; use SKIP="bench main" there), e.g.
#                 RANKS=8 TRITONEP_TEST_TOKENS=2048 TEST_FILTER="graph or (symmetric and 24)" on one H200
#   TEST_CONFIG_2  run the tests a second time with TRITONEP_TEST_CONFIG set to this (tritonep.Config
#                 fields, e.g. "dispatch_push_tile=(16, 512, 8)")
#   CE_PROBE_ARGS also run benchmarks/ce_peers_probe.py (copy-engine sends to every peer) with these
#                 arguments (e.g. "--mb-per-peer 105 --chunks 8")
#   PUSH_PROBE_ARGS  first run benchmarks/push_probe.py (one GPU: the dispatch push, peers' areas local)
#                 with these arguments (e.g. "--ranks 8 --num-sms 24 --tiles 16x512x8")
#   REDUCE_PROBE_ARGS  then benchmarks/reduce_probe.py (one GPU: the copy-engine combine's reduction and,
#                 with --send, its SM senders), e.g. "--num-sms 24 --tiles 64x256x16 --send --send-tiles 32x512"
#   STRESS_ARGS   after the tests, tools/stress.py with these arguments (ranks share GPU 0 with --gpu),
#                 e.g. "--gpu --minutes 2 --seed 24 --per-launch 40 --ranks 2 2"; STRESS_TIMEOUT (default 200)
#   HOST_ARGS     then benchmarks/bench_host.py with these arguments (host cost of eager calls, ranks
#                 may share one GPU), e.g. "--phases --batches 7 --iters 5", or "--floor" alone;
#                 HOST_TIMEOUT (default 200); HOST_BASE: a folder holding another tree of the repository (e.g.
#                 `git archive main | tar -x -C _base`, untracked so that it travels): the same benchmark
#                 there too, right after, so that a change's host figures meet their baseline on one host;
#                 HOST_BASE_FIRST=1: that tree first (the tree measured second has run slower: run both orders);
#                 HOST_ROUNDS=N: N such pairs, the order alternating (reports host_i.md, host_base_i.md)
# One GPU, correctness of the eager paths, stress and host cost in one command (~8 min):
#   RANKS=2 TRITONEP_TEST_TOKENS=512 TEST_FILTER="faults or replay or ops" TEST_TIMEOUT=240 SKIP="bench main" \
#   STRESS_ARGS="--gpu --minutes 1.5 --seed 24 --per-launch 40 --ranks 2 2" STRESS_TIMEOUT=150 \
#   HOST_ARGS="--phases --batches 7 --iters 5" HOST_TIMEOUT=150 bash tools/gpu_run.sh
# The same in ~5 min (the eager paths' must-haves, then the synced dispatch's host time by poll window;
# the host benchmark alone takes ~110 s on one H100):
#   RANKS=2 TRITONEP_TEST_TOKENS=512 TEST_FILTER="faults or cached_calls_replay or (low_latency and not shrink)" \
#   TEST_TIMEOUT=150 SKIP="bench main" HOST_ARGS="--ops synced do_cpu --phases --spin-ms 1 1000 --batches 7 \
#   --iters 5" HOST_TIMEOUT=150 bash tools/gpu_run.sh
# One rank on the GPU (wall against GPU time of each call; ~100 s with --phases, give it 150):
#   SKIP="tests bench main" HOST_ARGS="--ranks 1 --phases --batches 9 --iters 20" HOST_TIMEOUT=150 bash tools/gpu_run.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp}
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
nvidia-smi topo -m 2>&1 | head -$((N + 2))
skip() { [[ " ${SKIP:-} " == *" $1 "* ]]; }
if [ -n "${PUSH_PROBE_ARGS:-}" ]; then
  (cd benchmarks && timeout 200 python3 push_probe.py $PUSH_PROBE_ARGS) > "$OUT/push_probe.log" 2>&1
  grep -E "DIFFER|Error|programs" "$OUT/push_probe.log" | tail -${PROBE_LINES:-40}
fi
if [ -n "${REDUCE_PROBE_ARGS:-}" ]; then
  (cd benchmarks && timeout 200 python3 reduce_probe.py $REDUCE_PROBE_ARGS) > "$OUT/reduce_probe.log" 2>&1
  grep -E "WRONG|Error| us " "$OUT/reduce_probe.log" | tail -${PROBE_LINES:-40}
fi
# more test ranks than GPUs: the ranks share GPU 0 (correctness only, see tests/conftest.py)
if [ "${RANKS:-$N}" -gt "$N" ]; then export TRITONEP_TEST_SHARED_GPU=1; fi
skip tests || TRITONEP_TEST_RANKS=${RANKS:-$N} timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -x -q -s tests/gpu ${TEST_FILTER:+-k "$TEST_FILTER"} 2>&1 \
  | tee "$OUT/gpu_tests_${RANKS:-$N}.log" | grep -E "rows received|passed|failed|Error" | tail -5
if [ -n "${TEST_CONFIG_2:-}" ] && ! skip tests; then  # the same tests again with a Config
  echo "== tests with TRITONEP_TEST_CONFIG=$TEST_CONFIG_2"
  TRITONEP_TEST_CONFIG="$TEST_CONFIG_2" TRITONEP_TEST_RANKS=${RANKS:-$N} timeout "${TEST_TIMEOUT:-330}" \
    python3 -m pytest -x -q -s tests/gpu ${TEST_FILTER:+-k "$TEST_FILTER"} 2>&1 \
    | tee "$OUT/gpu_tests_config_${RANKS:-$N}.log" | grep -E "rows received|passed|failed|Error" | tail -5
fi
if [ -n "${STRESS_ARGS:-}" ]; then
  timeout "${STRESS_TIMEOUT:-200}" python3 tools/stress.py $STRESS_ARGS > "$OUT/stress.log" 2>&1; tail -3 "$OUT/stress.log"
fi
host_bench() {  # $1: the tree, $2: the report's name, $3: what of its log to print
  (cd "$1" && PYTHONPATH="$PWD" timeout "${HOST_TIMEOUT:-200}" python3 benchmarks/bench_host.py $HOST_ARGS \
    --out "$OUT/$2.md") > "$OUT/$2.log" 2>&1
  grep -A22 -E "$3" "$OUT/$2.log" | head -${HOST_LINES:-70}
}
if [ -n "${HOST_ARGS:-}" ]; then
  # with HOST_BASE, HOST_ROUNDS pairs whose order alternates (the tree measured second has run slower)
  for ((i = 1; i <= ${HOST_ROUNDS:-1}; i++)); do
    sfx=$([ "${HOST_ROUNDS:-1}" -gt 1 ] && echo "_$i")
    base_first=$(( (i + ${HOST_BASE_FIRST:-0}) % 2 == 0 ))
    if [ -n "${HOST_BASE:-}" ] && [ "$base_first" = 1 ]; then
      echo "== $HOST_BASE first"; host_bench "$HOST_BASE" "host_base$sfx" "^\| call"
    fi
    host_bench . "host$sfx" "^\| call|floor|^## Synced"
    if [ -n "${HOST_BASE:-}" ] && [ "$base_first" = 0 ]; then
      echo "== the same in $HOST_BASE"; host_bench "$HOST_BASE" "host_base$sfx" "^\| call"
    fi
  done
fi
if [ -n "${PROFILE_ARGS:-}" ]; then
  timeout 200 torchrun --nproc_per_node="$N" benchmarks/profile_ep.py $PROFILE_ARGS --trace "$OUT/traces" \
    > "$OUT/profile_$N.log" 2>&1; grep -vE "^W1|\*\*\*|OMP_NUM" "$OUT/profile_$N.log" | tail -${PROFILE_LINES:-100}
fi
if [ -n "${VDEV_ARGS:-}" ]; then
  TORCH_SYMMMEM=NVSHMEM timeout 200 torchrun --nproc_per_node="$N" benchmarks/vdev_peer.py $VDEV_ARGS \
    --out "$OUT/vdev_$N.json" > "$OUT/vdev_$N.log" 2>&1; grep -vE "^W1|\*\*\*|OMP_NUM" "$OUT/vdev_$N.log" | tail -20
fi
if [ -n "${CE_PROBE_ARGS:-}" ]; then
  timeout 120 torchrun --nproc_per_node="$N" benchmarks/ce_peers_probe.py $CE_PROBE_ARGS > "$OUT/ce_probe_$N.log" 2>&1
  grep -vE "^W1|\*\*\*|OMP_NUM" "$OUT/ce_probe_$N.log" | tail -8
fi
skip bench || timeout "${BENCH_TIMEOUT:-150}" torchrun --nproc_per_node="$N" benchmarks/bench_ep.py --tokens 4096 8192 --num-sms 24 132 \
  --out "$OUT/bench_$N.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_$N.log" | grep -vE "^W1|\*\*\*|OMP_NUM" | tail -12
skip main || timeout 90 python3 -m tritonep --steps 3 2>&1 | tee "$OUT/main_job_$N.log" | tail -6
