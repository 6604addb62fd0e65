"""Compile every tritonep kernel for sm_90 on a machine without a GPU (catches compile-mode errors
that the interpreter cannot see). Usage: python tools/compile_check.py"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
import tritonep.envs as envs  # noqa: E402

envs.no_gpu = lambda: False  # compile, don't interpret
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tritonep.kernels import combine, dispatch, primitives  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def sig(fn, types: dict, constexprs: dict):
    names = fn.arg_names
    signature = {n: types.get(n, "i32") for n in names}
    for n in constexprs:
        signature[n] = "constexpr"
    return ASTSource(fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})


P = {"*i32": "*i32", "*i64": "*i64", "*fp32": "*fp32", "*bf16": "*bf16"}
cases = [
    (dispatch._dispatch_push_kernel,
     dict(x_ptr="*i32", sf_ptr="*i32", topk_ptr="*i64", w_ptr="*fp32", dst_slot_ptr="*i32", cslot_ptr="*i32",
          counts_ptr="*i32", erank_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32",
          timeout_ns="i64"),
     dict(HAS_SF=True, HAS_WEIGHTS=True, WRITE_COUNTS=True, EXPAND=True, QUANT=False, ROUND=False, QGROUPS=8,
          BLOCK=1024, BLOCK_R=8, BLOCK_K=8, BLOCK_SF=64, BLOCK_C=64)),
    (dispatch._dispatch_push_kernel,
     dict(x_ptr="*i32", sf_ptr="*i32", topk_ptr="*i64", w_ptr="*fp32", dst_slot_ptr="*i32", cslot_ptr="*i32",
          counts_ptr="*i32", erank_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32",
          status_ptr="*i32", timeout_ns="i64"),
     dict(HAS_SF=False, HAS_WEIGHTS=True, WRITE_COUNTS=True, EXPAND=False, QUANT=True, ROUND=True, QGROUPS=8,
          BLOCK=1024, BLOCK_R=8, BLOCK_K=8, BLOCK_SF=1, BLOCK_C=64)),
    (dispatch._dispatch_count_kernel,
     dict(signal_ptrs="*i64", status_ptr="*i32", out_ptr="*i32", timeout_ns="i64"),
     dict(EXPAND=True, BLOCK_R=8, BLOCK_L=32)),
    (dispatch._dispatch_epilogue_kernel,
     dict(data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", psum_ptr="*i32",
          base_ptr="*i32",
          recv_x_ptr="*i32", recv_sf_ptr="*i32", recv_topk_ptr="*i64", recv_w_ptr="*fp32", recv_meta_ptr="*i32",
          timeout_ns="i64"),
     dict(WAIT=True, HAS_SF=True, HAS_WEIGHTS=True, EXPAND=False, POS_FROM_META=False, BLOCK=1024, BLOCK_R=8,
          BLOCK_K=8, BLOCK_SF=64)),
    (combine._combine_push_kernel,
     dict(x_ptr="*i32", w_ptr="*fp32", meta_ptr="*i32", psum_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64",
          counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(HAS_WEIGHTS=True, EXPAND=False, PER_SLOT=False, BLOCK=1024, BLOCK_R=8, BLOCK_K=8)),
    (combine._combine_reduce_kernel,
     dict(out_ptr="*bf16", out_w_ptr="*fp32", b0_ptr="*bf16", b1_ptr="*bf16", cslot_ptr="*i32", data_ptrs="*i64",
          signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(NUM_BIAS=2, HAS_WEIGHTS=True, PER_SLOT=False, BLOCK_H=1024, BLOCK_R=8, BLOCK_K=8)),
    (combine._combine_reduce_kernel,
     dict(out_ptr="*bf16", out_w_ptr="*fp32", b0_ptr="*bf16", b1_ptr="*bf16", cslot_ptr="*i32", data_ptrs="*i64",
          signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(NUM_BIAS=0, HAS_WEIGHTS=False, PER_SLOT=True, BLOCK_H=1024, BLOCK_R=8, BLOCK_K=8)),
    (dispatch._dispatch_epilogue_kernel,
     dict(data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", psum_ptr="*i32",
          base_ptr="*i32", recv_x_ptr="*i32", recv_sf_ptr="*i32", recv_topk_ptr="*i64", recv_w_ptr="*fp32",
          recv_meta_ptr="*i32", timeout_ns="i64"),
     dict(WAIT=False, HAS_SF=True, HAS_WEIGHTS=True, EXPAND=True, POS_FROM_META=False, BLOCK=1024, BLOCK_R=8,
          BLOCK_K=8, BLOCK_SF=64)),
    (dispatch._dispatch_epilogue_kernel,
     dict(data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", psum_ptr="*i32",
          base_ptr="*i32", recv_x_ptr="*i32", recv_sf_ptr="*i32", recv_topk_ptr="*i64", recv_w_ptr="*fp32",
          recv_meta_ptr="*i32", timeout_ns="i64"),
     dict(WAIT=True, HAS_SF=False, HAS_WEIGHTS=True, EXPAND=True, POS_FROM_META=True, BLOCK=1024, BLOCK_R=8,
          BLOCK_K=8, BLOCK_SF=1)),
    (combine._combine_push_kernel,
     dict(x_ptr="*i32", w_ptr="*fp32", meta_ptr="*i32", psum_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64",
          counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(HAS_WEIGHTS=True, EXPAND=True, PER_SLOT=False, BLOCK=1024, BLOCK_R=8, BLOCK_K=8)),
    (combine._combine_push_kernel,
     dict(x_ptr="*i32", w_ptr="*fp32", meta_ptr="*i32", psum_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64",
          counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(HAS_WEIGHTS=False, EXPAND=True, PER_SLOT=True, BLOCK=1024, BLOCK_R=8, BLOCK_K=8)),
    (primitives._barrier_kernel, dict(signal_ptrs="*i64", status_ptr="*i32", timeout_ns="i64"), dict(BLOCK_R=8)),
]
failed = 0
for fn, types, cx in cases:
    name = fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__
    try:
        k = triton.compile(sig(fn, types, cx), target=TARGET)
        print(f"ok   {name}: {k.metadata.num_warps} warps, {k.metadata.shared} B smem, regs n/a")
    except Exception as e:  # noqa: BLE001
        failed += 1
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
sys.exit(1 if failed else 0)
