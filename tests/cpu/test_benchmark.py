"""The benchmark program runs end to end on CPU ranks (a smoke test; real numbers come from GPUs)."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bench_ep_smoke(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29631",
           str(ROOT / "benchmarks" / "bench_ep.py"), "--tokens", "8", "--hidden", "256", "--experts", "8",
           "--topk", "2", "--warmup", "1", "--iters", "2", "--num-sms", "2", "--routing", "skewed",
           "--variants", "sm_copy", "--config", "dispatch_push_tile=(16, 512, 8)", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["op_peer"] for r in rows} == {"tritonep", "sm_copy", "config", "alltoall", "torch"}
    assert {r["dispatch_dtype"] for r in rows} == {"fp8", "bf16"}
    assert all(r["dispatch_us"] > 0 and r["combine_bf16_us"] > 0 for r in rows)
    assert "dispatch us" in run.stdout


def test_ce_peers_probe_smoke():
    # the copy-engine probe for the next 4-rank investigation: it runs (host memmoves on CPU ranks)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", "--master_port=29632",
           str(ROOT / "benchmarks" / "ce_peers_probe.py"), "--mb-per-peer", "0.01", "--chunks", "2", "--warmup", "1",
           "--iters", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "GB/s per rank" in run.stdout and "one stream, 2 chunks + flags" in run.stdout


def test_reduce_probe_checks_the_reduction():
    # the one-GPU check of the dense combine's reduction, under the interpreter, the default and two
    # more tiles; then half of the programs sending (the default step and 16 x 32 words: several
    # steps per row), alone and beside the reduction
    cmd = [sys.executable, str(ROOT / "benchmarks" / "reduce_probe.py"), "--tokens", "64", "--hidden", "256",
           "--experts", "8", "--topk", "4", "--num-sms", "3", "--tiles", "16x256x4", "64x128x4", "--send",
           "--send-tiles", "16x32"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT / "benchmarks",
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "WRONG" not in run.stdout and run.stdout.count("rows ok") == 3
    assert run.stdout.count("rows sent ok, flags raised ok") == 4 and run.stdout.count("reduced ok") == 2


def test_push_probe_checks_push_variants():
    # the one-GPU probe of the dispatch push: three tiles (the default 32x256x8, 16x512x8, 64x16x4)
    # give identical outputs, rank 0 of 3 (two peers' areas)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "push_probe.py"), "--tokens", "64", "--hidden", "256",
           "--experts", "12", "--topk", "4", "--ranks", "3", "--num-sms", "3", "--tiles", "16x512x8", "64x16x4"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT / "benchmarks",
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "DIFFER" not in run.stdout and run.stdout.count("identical") == 3


def test_rows_as_csv_and_plot(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_ep

    nan = float("nan")  # what the peers' rows hold in the columns that only tritonep has
    rows = [dict(tokens=t, op_peer=p, num_sms=s if p == "tritonep" else 0, dispatch_gbs=t / 100 * (s or 1),
                 combine_gbs=t / 90, copy_engine_gbs=300.0, nvlink_bytes_dispatch=t * 7e3,
                 nvlink_bytes_combine=t * 14e3, cached_dispatch_b2b_us=t / 10, combine_b2b_us=t / 8,
                 graph_cached_dispatch_us=t / 12 if p == "tritonep" else nan,
                 graph_combine_us=t / 9 if p == "tritonep" else nan)
            for t in (1024, 4096) for p, sms in (("tritonep", (8, 24)), ("alltoall", (0,))) for s in sms]
    bench_ep.write_rows(rows, str(tmp_path / "rows.csv"))
    lines = (tmp_path / "rows.csv").read_text().splitlines()
    assert lines[0].split(",") == list(rows[0]) and len(lines) == len(rows) + 1
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is an optional extra")
    bench_ep.plot_rows(rows, str(tmp_path / "bw.png"))
    assert (tmp_path / "bw.png").stat().st_size > 10_000


def _pipeline_worker(info):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from torch_pipeline import TorchPipeline

    n, H, E, k = 11, 128, 4 * info.world_size, 3
    g = torch.Generator().manual_seed(3 + info.rank)
    x = torch.randint(-8, 8, (n, H), generator=g).to(torch.bfloat16)  # small integers: sums are exact
    topk = torch.rand(n, E, generator=g).topk(k, dim=1).indices
    topk[0, 1] = -1  # an empty slot
    peer = TorchPipeline(info.group)
    grouped, _, _, handle, _ = peer.dispatch(x, topk_idx=topk, num_experts=E)
    assert grouped.shape[0] == handle.num_recv_tokens
    again, _, _, _, _ = peer.dispatch(x, handle=handle)  # cached: same rows
    assert torch.equal(again, grouped)
    out, _, _ = peer.combine(grouped.view(torch.bfloat16), handle)  # identity experts
    want = x.float() * (topk >= 0).sum(1, keepdim=True)
    assert torch.equal(out.float(), want)


def test_torch_pipeline_peer_moves_every_token_to_each_expert():
    """The benchmark's plain-torch peer is a timing peer, but it must still do the whole job: with
    identity experts, combine returns each token times its number of experts."""
    from tritonep.testing.launch import parallel_launch

    parallel_launch(3, _pipeline_worker)


def test_network_rows_table():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "network_rows.py"), "--tokens", "64", "--hosts", "2", "4"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT / "benchmarks",
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "hybrid rows" in run.stdout and len(run.stdout.splitlines()) == 4


def test_expert_rank_probe_checks_the_kernels():
    # expand mode's expert ranks: one block, and several (a prefix of earlier blocks' counts)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "expert_rank_probe.py"), "--tokens", "5", "200",
           "--experts", "40", "--topk", "6"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT / "benchmarks",
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "DIFFER" not in run.stdout and run.stdout.count("identical") == 2


def _bench_host():
    spec = importlib.util.spec_from_file_location("bench_host", ROOT / "benchmarks" / "bench_host.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_host_names_each_plan():
    """The host benchmark runs only on GPUs; what it says of the recorded plans is checked here on
    stand-ins: kinds from the plan keys (``eager.dispatch_key``), the split at a synced count read."""
    from types import SimpleNamespace as Stub

    bench = _bench_host()

    def key(cached, cpu_sync, expand):
        import torch
        from tritonep.eager import dispatch_key
        topk = None if cached else torch.zeros(2, 1, dtype=torch.int64)
        return dispatch_key(cached, torch.zeros(2, 8), topk, None, None, 8, 8, 1, 0, None, None, False, False,
                            cpu_sync, expand, False, False, False, False)

    def plan(launches, allocations, pause=None):
        return Stub(steps=[None] * launches, allocations=[None] * allocations, pause=pause)

    buf = Stub(_fresh_plans={key(False, None, False): (plan(4, 5, (2, 1, None)), None),
                             key(False, False, True): (plan(5, 4), None), key(False, True, False): 2},
               _kind_plans={(key(True, None, False), "kind"): plan(2, 3), (("combine",), "kind"): plan(1, 2)})
    assert bench._plan_sizes([buf]) == [
        "  bf16 buffer, synced dispatch: 4 launches, 5 allocations (2 launches and 4 allocations after the count read)",
        "  bf16 buffer, no-sync dispatch, expanded: 5 launches, 4 allocations",
        "  bf16 buffer, cached dispatch: 2 launches, 3 allocations",
        "  bf16 buffer, combine: 1 launch, 2 allocations"]
    cores = bench._physical_cores()
    assert cores and set(cores) <= os.sched_getaffinity(0)
