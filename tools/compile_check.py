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

from tritonep.kernels import combine, combine_rows, dispatch, dispatch_rows, layout, primitives  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def sig(fn, types: dict, constexprs: dict, aligned=()):
    """``aligned``: arguments the launcher would specialize as divisible by 16 (pointers from torch
    allocations, row sizes): the same hints a real launch gives the compiler."""
    names = fn.arg_names
    signature = {n: types.get(n, "*i32" if n == "seq_ptr" else "i32") for n in names}
    for n in constexprs:
        signature[n] = "constexpr"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return ASTSource(fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                     attrs=attrs)


P = {"*i32": "*i32", "*i64": "*i64", "*fp32": "*fp32", "*bf16": "*bf16"}
cases = [
    (dispatch._dispatch_push_kernel,
     dict(x_ptr="*i32", sf_ptr="*i32", topk_ptr="*i64", w_ptr="*fp32", dst_slot_ptr="*i32", cslot_ptr="*i32",
          erank_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32",
          timeout_ns="i64"),
     dict(HAS_SF=True, HAS_WEIGHTS=True, EXPAND=True, QUANT=False, ROUND=False, QGROUPS=8,
          BLOCK=1024, BLOCK_R=8, BLOCK_K=8, BLOCK_SF=64)),
    (dispatch._dispatch_push_kernel,
     dict(x_ptr="*i32", sf_ptr="*i32", topk_ptr="*i64", w_ptr="*fp32", dst_slot_ptr="*i32", cslot_ptr="*i32",
          erank_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32",
          status_ptr="*i32", timeout_ns="i64"),
     dict(HAS_SF=False, HAS_WEIGHTS=True, EXPAND=False, QUANT=True, ROUND=True, QGROUPS=8,
          BLOCK=1024, BLOCK_R=8, BLOCK_K=8, BLOCK_SF=1)),
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
    (primitives._release_kernel, dict(signal_ptrs="*i64", status_ptr="*i32"), dict(BLOCK_R=8)),
    (primitives._enter_kernel, dict(signal_ptrs="*i64", status_ptr="*i32", timeout_ns="i64"),
     dict(OP=3, BLOCK_R=8)),
    (primitives._set_words_kernel, dict(addr="i64", count="i32", value="i32"), dict(BLOCK=16)),
    (layout._layout_count_kernel,
     dict(topk_ptr="*i64", topk_copy_ptr="*i64", block_counts_ptr="*i32", block_base_ptr="*i32", acc_ptr="*i32",
          send_counts_ptr="*i32", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(COPY=True, BT=16, BK=8, BR=8, BC=256, CH=128)),
    (layout._layout_slots_kernel, dict(topk_ptr="*i64", block_base_ptr="*i32", dst_slot_ptr="*i32", cslot_ptr="*i32"),
     dict(BT=64, BK=8, BR=8)),
    (layout._layout_gather_kernel,
     dict(signal_ptrs="*i64", status_ptr="*i32", out_ptr="*i32", host_ptr="*i32", timeout_ns="i64"),
     dict(EXPAND=True, TO_HOST=True, END_OP=True, BR=8, BL=32)),
]
ROWS = dict(BT=dispatch_rows.BLOCK_TOKENS, BW=dispatch_rows.BLOCK_WORDS, BR=2, BK=8)
PUSH_ROWS = dict(ROWS, CB=dispatch_rows.BLOCK_TOKENS)
PUSH_TYPES = dict(x_ptr="*i32", sf_ptr="*i32", topk_ptr="*i64", w_ptr="*fp32", dst_slot_ptr="*i32", cslot_ptr="*i32",
                  block_base_ptr="*i32", psum_ptr="*i32", recv_x_ptr="*i32", recv_sf_ptr="*i32", recv_topk_ptr="*i64",
                  recv_w_ptr="*fp32", recv_meta_ptr="*i32", heap_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64",
                  counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64")
PUSH_ALIGNED = ("x_ptr", "recv_x_ptr", "heap_ptr", "x_words", "row_words", "aux_word0", "aux_words")
COPIED_TYPES = dict(out_ptr="*bf16", out_w_ptr="*fp32", b0_ptr="*bf16", b1_ptr="*bf16", x_off="i64", w_ptr="*fp32",
                    psum_ptr="*i32", topk_ptr="*i64", dst_slot_ptr="*i32", cslot_ptr="*i32", heap_ptr="*bf16",
                    heap_w_ptr="*fp32", heap_words_ptr="*i32", x_words_ptr="*i32", data_ptrs="*i64",
                    signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64")


def push_case(**constexprs):
    """A case of the dispatch push: a cached, unfused push of FP8 rows with weights in 16 x 512 steps
    (the pipelined push's tile), but for ``constexprs``."""
    cx = dict(WAIT_FREED=True, COUNTS_FROM_PEERS=False, PLACE=False, HAS_SF=True, HAS_WEIGHTS=True, PIPELINED=False,
              COUNT=False, END_OP=False, FUSED=False, PREFETCH=False, BSF=64, **PUSH_ROWS)
    return dispatch_rows._push_kernel, PUSH_TYPES, {**cx, **constexprs}, PUSH_ALIGNED


# the default push's steps (fused, loading ahead): 32 x 256
DEFAULT_PUSH = dict(FUSED=True, PREFETCH=True, BT=dispatch_rows.PUSH_TILE[0], BW=dispatch_rows.PUSH_TILE[1])
# the copy kernels: (kernel, types, constexprs, arguments a launch specializes as 16-byte aligned)
cases += [
    push_case(**DEFAULT_PUSH),  # cached
    push_case(WAIT_FREED=False, COUNTS_FROM_PEERS=False, PLACE=True, **DEFAULT_PUSH),  # fresh
    push_case(WAIT_FREED=False, COUNTS_FROM_PEERS=True, PLACE=True),  # fresh, counts from peers
    push_case(PIPELINED=True, COUNT=True, END_OP=True),
    # the variant the GPU caught first: counts from peers, pipelined
    push_case(WAIT_FREED=False, COUNTS_FROM_PEERS=True, PLACE=True, HAS_SF=False, PIPELINED=True, COUNT=True, BSF=1),
    push_case(COUNT=True, FUSED=True),  # cached dispatch counting rows for the overlapped copy-out
    push_case(FUSED=True, PREFETCH=True),  # the loads of the next columns ahead, fused and not
    push_case(PREFETCH=True),
    (dispatch_rows._arrivals_kernel,
     dict(heap_ptr="*i32", signal_ptrs="*i64", status_ptr="*i32", psum_ptr="*i32", recv_sf_ptr="*i32",
          recv_topk_ptr="*i64", recv_w_ptr="*fp32", recv_meta_ptr="*i32", timeout_ns="i64"),
     dict(HAS_SF=True, HAS_WEIGHTS=True, BT=dispatch_rows.BLOCK_TOKENS, BC=64, BM=dispatch_rows.ARRIVAL_TOKENS, BK=8,
          BSF=64)),
] + [
    # the epilogue with the row copy, and without it (the copy engine moves the rows)
    (dispatch_rows._epilogue_kernel,
     dict(heap_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32",
          psum_ptr="*i32", recv_x_ptr="*i32", recv_sf_ptr="*i32", recv_topk_ptr="*i64", recv_w_ptr="*fp32",
          recv_meta_ptr="*i32", timeout_ns="i64"),
     dict(HAS_SF=True, HAS_WEIGHTS=True, COPY_X=copy_x, ZERO_COUNTS=copy_x, BSF=64, **ROWS),
     ("heap_ptr", "recv_x_ptr", "x_words", "row_words", "aux_word0", "aux_words"))
    for copy_x in (True, False)
] + [
    (combine_rows._push_kernel,
     dict(x_ptr="*i32", w_ptr="*fp32", meta_ptr="*i32", psum_ptr="*i32", heap_ptr="*i32", data_ptrs="*i64",
          signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(HAS_WEIGHTS=True, **ROWS), ("x_ptr", "heap_ptr", "x_words", "slot_bytes")),
    (combine_rows._reduce_kernel,
     dict(out_ptr="*bf16", out_w_ptr="*fp32", b0_ptr="*bf16", b1_ptr="*bf16", x_off="i64", w_ptr="*fp32",
          psum_ptr="*i32", topk_ptr="*i64", dst_slot_ptr="*i32", cslot_ptr="*i32", heap_ptr="*bf16",
          heap_w_ptr="*fp32", data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32",
          timeout_ns="i64"),
     dict(NUM_BIAS=1, HAS_WEIGHTS=True, NJ=2, BT=combine_rows.REDUCE_TOKENS, BH=combine_rows.reduce_channels(2, 8),
          BR=2, BK=8),
     ("out_ptr", "b0_ptr", "heap_ptr", "hidden", "slot_bytes")),
    (combine_rows._pipelined_kernel,
     dict(x_ptr="*i32", w_ptr="*fp32", meta_ptr="*i32", psum_ptr="*i32", heap_words_ptr="*i32", out_ptr="*bf16",
          out_w_ptr="*fp32", b0_ptr="*bf16", b1_ptr="*bf16", x_off="i64", topk_ptr="*i64", dst_slot_ptr="*i32",
          cslot_ptr="*i32", heap_ptr="*bf16", heap_w_ptr="*fp32", data_ptrs="*i64", signal_ptrs="*i64",
          counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(NUM_BIAS=1, HAS_WEIGHTS=True, NJ=2, BT=combine_rows.BLOCK_ROWS, BW=combine_rows.BLOCK_WORDS,
          BTR=combine_rows.REDUCE_TOKENS, BH=combine_rows.reduce_channels(2, 8), BR=2, BK=8),
     ("x_ptr", "heap_words_ptr", "x_words", "out_ptr", "b0_ptr", "heap_ptr", "hidden", "slot_bytes")),
    (dispatch_rows._gather_kernel,
     dict(heap_ptr="*i32", heap_i64_ptr="*i64", x_off="i64", sf_off="i64", topk_off="i64", w_off="i64",
          recv_x_ptr="*i32", recv_sf_ptr="*i32", recv_topk_ptr="*i64", recv_w_ptr="*fp32", meta_ptr="*i32",
          psum_ptr="*i32", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(HAS_SF=True, HAS_WEIGHTS=True, BT=dispatch_rows.EPILOGUE_TOKENS, BW=dispatch_rows.EPILOGUE_WORDS, BR=2,
          BK=8, BSF=64),
     ("heap_ptr", "recv_x_ptr", "x_words", "x_off")),
] + [
    # the copy-engine combine's reduction, without and with SM senders loading ahead
    (combine_rows._copied_reduce_kernel, COPIED_TYPES,
     dict(NUM_BIAS=1, HAS_WEIGHTS=True, NJ=2, BT=bt, BH=bh, BR=2, BK=8, BTP=combine_rows.BLOCK_ROWS,
          BW=combine_rows.BLOCK_WORDS, PREFETCH=ahead),
     ("out_ptr", "b0_ptr", "heap_ptr", "hidden", "heap_words_ptr", "x_words_ptr", "x_words"))
    for bt, bh, ahead in [(combine_rows.REDUCE_TOKENS, combine_rows.reduce_channels(2, 8), False),
                          (*combine_rows.copied_reduce_tile(2, 8)[:2], True)]
]
failed = 0
for fn, types, cx, *aligned in cases:
    name = fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__
    try:
        opts = {"num_warps": 8} if aligned else {}
        k = triton.compile(sig(fn, types, cx, aligned[0] if aligned else ()), target=TARGET, options=opts)
        ptx = k.asm["ptx"]
        vec = {op: ptx.count(f"{op}.global.v4") + ptx.count(f"{op}.global.L1::evict_last.v4")
               for op in ("ld", "st")}
        print(f"ok   {name}: {k.metadata.num_warps} warps, {k.metadata.shared} B smem, "
              f"128-bit loads/stores in PTX: {vec['ld']}/{vec['st']}")
    except Exception as e:  # noqa: BLE001
        failed += 1
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
sys.exit(1 if failed else 0)
