"""Compile every tritonep kernel for sm_90 on a machine without a GPU (catches compile-mode errors
that the interpreter cannot see). Usage: python tools/compile_check.py

Triton versions differ in what they compile: check the version the GPUs run too, e.g. an unpacked
wheel (``pip download triton==3.6.0 --no-deps``, unzip, ``chmod +x triton/backends/nvidia/bin/*``)
first on the path: ``PYTHONPATH=<unpacked>:. python tools/compile_check.py``."""
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
import tritonep.envs as envs  # noqa: E402

envs.no_gpu = lambda: False  # compile, don't interpret
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tritonep.config import defaults_for  # noqa: E402
from tritonep.kernels import (combine, combine_dense, combine_expand, dispatch, dispatch_expand, layout,  # noqa: E402
                             low_latency, primitives)

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
    (dispatch_expand._dispatch_push_kernel,
     dict(x_ptr="*i32", sf_ptr="*i32", topk_ptr="*i64", w_ptr="*fp32", dst_slot_ptr="*i32", cslot_ptr="*i32",
          erank_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32",
          timeout_ns="i64"),
     dict(HAS_SF=True, HAS_WEIGHTS=True, EXPAND=True, QUANT=False, ROUND=False, QGROUPS=8,
          BLOCK=1024, BLOCK_R=8, BLOCK_K=8, BLOCK_SF=64)),
    (dispatch_expand._dispatch_push_kernel,
     dict(x_ptr="*i32", sf_ptr="*i32", topk_ptr="*i64", w_ptr="*fp32", dst_slot_ptr="*i32", cslot_ptr="*i32",
          erank_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32",
          status_ptr="*i32", timeout_ns="i64"),
     dict(HAS_SF=False, HAS_WEIGHTS=True, EXPAND=False, QUANT=True, ROUND=True, QGROUPS=8,
          BLOCK=1024, BLOCK_R=8, BLOCK_K=8, BLOCK_SF=1)),
    (dispatch_expand._dispatch_epilogue_kernel,
     dict(data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", psum_ptr="*i32",
          base_ptr="*i32",
          recv_x_ptr="*i32", recv_sf_ptr="*i32", recv_topk_ptr="*i64", recv_w_ptr="*fp32", recv_meta_ptr="*i32",
          timeout_ns="i64"),
     dict(WAIT=True, HAS_SF=True, HAS_WEIGHTS=True, EXPAND=False, POS_FROM_META=False, CAPPED=True, BLOCK=1024,
          BLOCK_R=8, BLOCK_K=8, BLOCK_SF=64)),
    (combine_expand._combine_push_kernel,
     dict(x_ptr="*i32", w_ptr="*fp32", meta_ptr="*i32", psum_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64",
          counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(HAS_WEIGHTS=True, EXPAND=False, PER_SLOT=False, BLOCK=1024, BLOCK_R=8, BLOCK_K=8)),
    (combine_expand._combine_reduce_kernel,
     dict(out_ptr="*bf16", out_w_ptr="*fp32", b0_ptr="*bf16", b1_ptr="*bf16", cslot_ptr="*i32", data_ptrs="*i64",
          signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(NUM_BIAS=2, HAS_WEIGHTS=True, PER_SLOT=False, BLOCK_H=1024, BLOCK_R=8, BLOCK_K=8)),
    (combine_expand._combine_reduce_kernel,
     dict(out_ptr="*bf16", out_w_ptr="*fp32", b0_ptr="*bf16", b1_ptr="*bf16", cslot_ptr="*i32", data_ptrs="*i64",
          signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(NUM_BIAS=0, HAS_WEIGHTS=False, PER_SLOT=True, BLOCK_H=1024, BLOCK_R=8, BLOCK_K=8)),
    (dispatch_expand._dispatch_epilogue_kernel,
     dict(data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", psum_ptr="*i32",
          base_ptr="*i32", recv_x_ptr="*i32", recv_sf_ptr="*i32", recv_topk_ptr="*i64", recv_w_ptr="*fp32",
          recv_meta_ptr="*i32", timeout_ns="i64"),
     dict(WAIT=False, HAS_SF=True, HAS_WEIGHTS=True, EXPAND=True, POS_FROM_META=False, CAPPED=True, BLOCK=1024,
          BLOCK_R=8, BLOCK_K=8, BLOCK_SF=64)),
    (dispatch_expand._dispatch_epilogue_kernel,
     dict(data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", psum_ptr="*i32",
          base_ptr="*i32", recv_x_ptr="*i32", recv_sf_ptr="*i32", recv_topk_ptr="*i64", recv_w_ptr="*fp32",
          recv_meta_ptr="*i32", timeout_ns="i64"),
     dict(WAIT=True, HAS_SF=False, HAS_WEIGHTS=True, EXPAND=True, POS_FROM_META=True, CAPPED=False, BLOCK=1024,
          BLOCK_R=8, BLOCK_K=8, BLOCK_SF=1)),
    (combine_expand._combine_push_kernel,
     dict(x_ptr="*i32", w_ptr="*fp32", meta_ptr="*i32", psum_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64",
          counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(HAS_WEIGHTS=True, EXPAND=True, PER_SLOT=False, BLOCK=1024, BLOCK_R=8, BLOCK_K=8)),
    (combine_expand._combine_push_kernel,
     dict(x_ptr="*i32", w_ptr="*fp32", meta_ptr="*i32", psum_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64",
          counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(HAS_WEIGHTS=False, EXPAND=True, PER_SLOT=True, BLOCK=1024, BLOCK_R=8, BLOCK_K=8)),
    (primitives._barrier_kernel, dict(signal_ptrs="*i64", status_ptr="*i32", timeout_ns="i64"), dict(BLOCK_R=8)),
    (primitives._barrier_kernel, dict(signal_ptrs="*i64", status_ptr="*i32", timeout_ns="i64"), dict(BLOCK_R=2)),
    (primitives._release_kernel, dict(signal_ptrs="*i64", status_ptr="*i32"), dict(BLOCK_R=8)),
    (primitives._enter_kernel, dict(signal_ptrs="*i64", status_ptr="*i32", timeout_ns="i64"),
     dict(OP=3, BLOCK_R=8)),
] + [
    # the count kernel alone, and with the gather for a synced dispatch of plain rows
    (layout._layout_count_kernel,
     dict(topk_ptr="*i64", topk_copy_ptr="*i64", block_counts_ptr="*i32", block_base_ptr="*i32", acc_ptr="*i32",
          send_counts_ptr="*i32", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64",
          info_ptr="*i32", host_ptr="*i32", wait_ptr="*i64"),
     dict(COPY=True, BT=16, BK=8, BR=8, BC=256, CH=128, GATHER=gather, EXPAND=False, TO_HOST=gather, BL=32))
    for gather in (False, True)
] + [
    (layout._layout_slots_kernel, dict(topk_ptr="*i64", block_base_ptr="*i32", dst_slot_ptr="*i32", cslot_ptr="*i32"),
     dict(BT=64, BK=8, BR=8)),
    (layout._layout_gather_kernel,
     dict(signal_ptrs="*i64", status_ptr="*i32", out_ptr="*i32", host_ptr="*i32", wait_ptr="*i64", timeout_ns="i64"),
     dict(EXPAND=True, TO_HOST=True, CAPPED=False, BR=8, BL=32)),
    (layout._layout_gather_kernel,
     dict(signal_ptrs="*i64", status_ptr="*i32", out_ptr="*i32", host_ptr="*i32", wait_ptr="*i64", timeout_ns="i64"),
     dict(EXPAND=False, TO_HOST=False, CAPPED=True, BR=8, BL=32)),
    (layout._expert_block_counts_kernel, dict(topk_ptr="*i64", counts_ptr="*i32"), dict(BT=64, BK=8, BE=32)),
    (layout._expert_rank_kernel, dict(topk_ptr="*i64", counts_ptr="*i32", out_ptr="*i32"),
     dict(BT=64, BK=8, BE=32, NB=128)),
]
DEFAULT = defaults_for(2)
ROWS = dict(BT=dispatch.BLOCK_TOKENS, BW=512, BR=2, BK=8)
PUSH_TYPES = dict(x_ptr="*i32", sf_ptr="*i32", topk_ptr="*i64", w_ptr="*fp32", dst_slot_ptr="*i32", cslot_ptr="*i32",
                  block_base_ptr="*i32", psum_ptr="*i32", recv_x_ptr="*i32", recv_sf_ptr="*i32", recv_topk_ptr="*i64",
                  recv_w_ptr="*fp32", recv_meta_ptr="*i32", heap_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64",
                  counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64", info_ptr="*i32", wait_ptr="*i64")
PUSH_ALIGNED = ("x_ptr", "recv_x_ptr", "heap_ptr", "x_words", "row_words", "aux_word0", "aux_words")
DENSE_TYPES = dict(out_ptr="*bf16", out_w_ptr="*fp32", b0_ptr="*bf16", b1_ptr="*bf16", x_off="i64", w_ptr="*fp32",
                   psum_ptr="*i32", topk_ptr="*i64", dst_slot_ptr="*i32", cslot_ptr="*i32", heap_ptr="*bf16",
                   heap_w_ptr="*fp32", heap_words_ptr="*i32", x_words_ptr="*i32", data_ptrs="*i64",
                   signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64")


def push_case(**constexprs):
    """A case of the dispatch push: a cached push of FP8 rows with weights in the default steps, but
    for ``constexprs``."""
    bt, bw, _ = DEFAULT.dispatch_push_tile
    cx = dict(WAIT_FREED=True, COUNTS_FROM_PEERS=False, PLACE=False, HAS_SF=True, HAS_WEIGHTS=True, BSF=64, BT=bt,
              BW=bw, BR=2, BK=8, CB=dispatch.BLOCK_TOKENS, GATHER=False, CAPPED=False, BL=32)
    return dispatch._push_kernel, PUSH_TYPES, {**cx, **constexprs}, PUSH_ALIGNED


RT = combine.reduce_tile(DEFAULT.combine_reduce_tile, 2, 8)
PT = DEFAULT.combine_push_tile
# the copy kernels: (kernel, types, constexprs, arguments a launch specializes as 16-byte aligned)
cases += [
    push_case(),  # cached
    push_case(WAIT_FREED=False, PLACE=True),  # fresh
    # fresh, counts from peers (no CPU sync), gathering them too; and with outputs below the worst case
    push_case(WAIT_FREED=False, COUNTS_FROM_PEERS=True, PLACE=True, GATHER=True),
    push_case(WAIT_FREED=False, COUNTS_FROM_PEERS=True, PLACE=True, GATHER=True, CAPPED=True),
    push_case(HAS_SF=False, BSF=1, BT=16, BW=512),  # bf16 rows, 16 x 512 steps
] + [
    # the epilogue with the row copy, and without it (the copy engine moves the rows)
    (dispatch._epilogue_kernel,
     dict(heap_ptr="*i32", data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32",
          psum_ptr="*i32", recv_x_ptr="*i32", recv_sf_ptr="*i32", recv_topk_ptr="*i64", recv_w_ptr="*fp32",
          recv_meta_ptr="*i32", timeout_ns="i64"),
     dict(HAS_SF=True, HAS_WEIGHTS=True, COPY_X=copy_x, CAPPED=capped, BSF=64, **ROWS),
     ("heap_ptr", "recv_x_ptr", "x_words", "row_words", "aux_word0", "aux_words"))
    for copy_x, capped in ((True, False), (False, False), (True, True))
] + [
    (combine._push_kernel,
     dict(x_ptr="*i32", w_ptr="*fp32", meta_ptr="*i32", psum_ptr="*i32", heap_ptr="*i32", data_ptrs="*i64",
          signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(HAS_WEIGHTS=True, BT=PT[0], BW=PT[1], BR=2, BK=8), ("x_ptr", "heap_ptr", "x_words", "slot_bytes")),
    (combine._reduce_kernel,
     dict(out_ptr="*bf16", out_w_ptr="*fp32", b0_ptr="*bf16", b1_ptr="*bf16", x_off="i64", w_ptr="*fp32",
          psum_ptr="*i32", topk_ptr="*i64", dst_slot_ptr="*i32", cslot_ptr="*i32", heap_ptr="*bf16",
          heap_w_ptr="*fp32", data_ptrs="*i64", signal_ptrs="*i64", counter_ptr="*i32", status_ptr="*i32",
          timeout_ns="i64"),
     dict(NUM_BIAS=1, HAS_WEIGHTS=True, NJ=2, BT=RT[0], BH=RT[1], BR=2, BK=8),
     ("out_ptr", "b0_ptr", "heap_ptr", "hidden", "slot_bytes")),
    (combine._pipelined_kernel,
     dict(x_ptr="*i32", w_ptr="*fp32", meta_ptr="*i32", psum_ptr="*i32", heap_words_ptr="*i32", out_ptr="*bf16",
          out_w_ptr="*fp32", b0_ptr="*bf16", b1_ptr="*bf16", x_off="i64", topk_ptr="*i64", dst_slot_ptr="*i32",
          cslot_ptr="*i32", heap_ptr="*bf16", heap_w_ptr="*fp32", data_ptrs="*i64", signal_ptrs="*i64",
          counter_ptr="*i32", status_ptr="*i32", timeout_ns="i64"),
     dict(NUM_BIAS=1, HAS_WEIGHTS=True, NJ=2, BT=PT[0], BW=PT[1], BTR=RT[0], BH=RT[1], BR=2, BK=8),
     ("x_ptr", "heap_words_ptr", "x_words", "out_ptr", "b0_ptr", "heap_ptr", "hidden", "slot_bytes")),
] + [
    # the dense combine's reduction alone (the copy engine sends) and with its SM senders loading
    # ahead, in the default steps
    (combine_dense._dense_reduce_kernel, DENSE_TYPES,
     dict(NUM_BIAS=1, HAS_WEIGHTS=True, NJ=2, BT=bt, BH=bh, BR=2, BK=8, BTP=DEFAULT.combine_dense_send_tile[0],
          BW=DEFAULT.combine_dense_send_tile[1], SEND=send),
     ("out_ptr", "b0_ptr", "heap_ptr", "hidden", "heap_words_ptr", "x_words_ptr", "x_words"))
    for send in (False, True)
    for bt, bh in [combine_dense.dense_reduce_tile(DEFAULT.combine_dense_reduce_tile, 2, 8)[:2]]
]
LL = dict(data_ptrs="*i64", signal_ptrs="*i64", seq_ptr="*i32", counter_ptr="*i32", status_ptr="*i32",
          wait_ptr="*i64", mask_ptr="*i32", peak_ptr="*i32", timeout_ns="i64")
cases += [
    # V1's low-latency receivers (the kernels of that family that wait on peers)
    (low_latency._dispatch_recv_kernel,
     dict(recv_x_ptr="*i32", recv_sf_ptr="*i32", src_info_ptr="*i32", slot_info_ptr="*i32", layout_ptr="*i64",
          count_ptr="*i32", stats_ptr="*i32", **LL),
     dict(HAS_SF=sf, UE8M0=False, HAS_STATS=True, HAS_WAIT=True, SHRINK=shrink, CAPPED=capped, BR=br, BJ=16,
          BW=512, BSF=64))
    for sf, shrink, capped, br in ((True, False, True, 8), (False, True, True, 2), (True, False, False, 8))
] + [
    (low_latency._combine_recv_kernel, dict(out_ptr="*bf16", topk_ptr="*i64", w_ptr="*fp32", **LL),
     dict(HAS_WAIT=True, SHRINK=shrink, BK=8, BH=1024))
    for shrink in (False, True)
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
