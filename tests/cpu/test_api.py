"""The public surface is pinned, and importing tritonep has no side effects."""
import os
import subprocess
import sys

import pytest

import tritonep


def test_public_names():
    assert sorted(tritonep.__all__) == sorted(
        ["ElasticBuffer", "EPHandle", "EventOverlap", "Buffer", "Config", "KernelConfig", "topk_idx_t",
         "CommTimeoutError", "RecvOverflowError", "recv_capacity", "get_physical_domain_size",
         "get_logical_domain_size", "__version__"])
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
    assert "PASS" in out.stdout and "step 1/1  loss" in out.stdout and "dense layer" in out.stdout


@pytest.mark.parametrize("args", [["--tokens", "-5"], ["--experts", "4", "--topk", "8"], ["--ranks", "0"],
                                  ["--ranks", "3"], ["--hidden", "100"]])
def test_main_job_rejects_bad_arguments_in_one_line(args):
    # checked in the parent before any rank starts: exit code 2, one line, no traceback
    out = subprocess.run([sys.executable, "-m", "tritonep", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in out.stderr and not out.stdout, out.stdout + out.stderr


def test_event_overlap_hook_after_wait():
    # DeepEP's EventOverlap keeps its hook in ``hook_after_wait``; a wait runs it once
    from tritonep.handle import CompletedEvent

    ev = tritonep.EventOverlap(CompletedEvent())
    assert ev.hook_after_wait is None
    ran = []
    ev.register_hook_after_wait(lambda: ran.append(1))
    ev.current_stream_wait()
    ev.current_stream_wait()
    assert ran == [1] and ev.hook_after_wait is None


def test_handle_fields_in_deepep_order():
    # a positional reader of DeepEP's EPHandle finds the same fields at the same places
    import dataclasses

    names = [f.name for f in dataclasses.fields(tritonep.EPHandle)]
    assert names[:17] == [
        "do_expand", "num_experts", "expert_alignment", "num_max_tokens_per_rank", "num_sms", "topk_idx",
        "num_recv_tokens", "num_expanded_tokens", "num_recv_tokens_per_expert_list",
        "psum_num_recv_tokens_per_scaleup_rank", "psum_num_recv_tokens_per_expert",
        "num_unaligned_recv_tokens_per_expert", "recv_src_metadata", "dst_buffer_slot_idx",
        "token_metadata_at_forward", "channel_linked_list", "cached_recv_src_metadata_before_sort"]


@pytest.mark.parametrize("example", ["moe_layer.py", "megatron_dispatcher.py", "torchtitan_ep.py"])
def test_examples_run(example):
    # moe_layer.py is README's example as a program; the others wrap tritonep.ops the ways Megatron
    # and torchtitan wrap DeepEP. Each checks itself against the layer without expert parallelism.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(root, "examples", example)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "PASS" in out.stdout, out.stdout + out.stderr
