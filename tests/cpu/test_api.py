"""The public surface is pinned, and importing tritonep has no side effects."""
import os
import subprocess
import sys

import tritonep


def test_public_names():
    assert sorted(tritonep.__all__) == sorted(
        ["ElasticBuffer", "EPHandle", "EventOverlap", "topk_idx_t", "CommTimeoutError", "__version__"])
    import torch

    assert tritonep.topk_idx_t is torch.int64


def test_import_has_no_side_effects():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import os, sys, tritonep; assert 'TRITON_INTERPRET' not in os.environ; "
            "assert 'tritonep.kernels' not in sys.modules; print('clean')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


def test_main_job_runs_and_passes():
    out = subprocess.run([sys.executable, "-m", "tritonep", "--ranks", "2", "--tokens", "8", "--hidden", "128",
                          "--experts", "4", "--topk", "2", "--steps", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS" in out.stdout and "max abs error" in out.stdout
