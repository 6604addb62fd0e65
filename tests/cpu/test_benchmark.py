"""The benchmark program runs end to end on CPU ranks (a smoke test; real numbers come from GPUs)."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bench_ep_smoke(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29631",
           str(ROOT / "benchmarks" / "bench_ep.py"), "--tokens", "8", "--hidden", "256", "--experts", "8",
           "--topk", "2", "--warmup", "1", "--iters", "2", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["op_peer"] for r in rows} == {"tritonep", "alltoall"}
    assert all(r["dispatch_fp8_us"] > 0 and r["combine_bf16_us"] > 0 for r in rows)
    assert "dispatch us" in run.stdout
