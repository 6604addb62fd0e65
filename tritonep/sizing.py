"""Byte budgets of the symmetric buffer: pure integer arithmetic, no allocation.

Vocabulary: ``num_ranks`` (R), ``num_max_tokens_per_rank`` (T), ``hidden`` (H), ``num_topk`` (k),
``num_experts`` (E), ``num_local_experts`` (L = E / R), ``num_sf_packs`` (P, 4-byte scale packs
per token; 0 for BF16).

Two formulas live here:

* :func:`get_buffer_size_hint` is DeepEP V2's published formula (spec 1.3), raised where tritonep's
  own layout needs more (expand mode, a few top-k values), so every call fits a hinted buffer.
* :func:`dispatch_bytes` / :func:`combine_bytes` are what tritonep's own layout needs for one call;
  a call that does not fit raises ``ValueError`` naming both sizes.

Example (spec 1.3): ``get_buffer_size_hint(8, 4096, 7168) == 484_442_112``.
"""
from __future__ import annotations

import math

ALIGNMENT = 2 * 1024 * 1024  # DeepEP's buffer granularity (2 MiB)
SLOT_ALIGN = 16  # tritonep aligns every part of a slot to 16 bytes (one 128-bit vector)
#: The per-source count header is sized for DeepEP's limit of 256 local experts.
MAX_LOCAL_EXPERTS = 256


def align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def get_buffer_size_hint(
    num_ranks: int,
    num_max_tokens_per_rank: int,
    hidden: int,
    num_topk: int = 0,
    use_fp8_dispatch: bool = False,
    allow_multiple_reduction: bool = True,
    num_scaleout_ranks: int = 1,
    num_nvlink_ranks: int | None = None,
) -> int:
    """DeepEP V2's buffer size (spec 1.3), in bytes: direct mode (``num_scaleout_ranks == 1``) over
    NVLink when ``num_nvlink_ranks`` (ranks per host; None: all) covers the group, else with its
    send areas for peers on other hosts; hybrid mode when ``num_scaleout_ranks > 1`` (hosts).

    ``num_topk=0`` sizes for the maximum of 32. FP8 assumes ``ceil(H/32)`` scale packs, as DeepEP does.
    The result is a multiple of 2 MiB. Example: 2 hosts x 8, ``T = 4096``, ``H = 7168``, BF16:
    ``get_buffer_size_hint(16, 4096, 7168, num_scaleout_ranks=2, num_nvlink_ranks=8) == 1_233_125_376``.
    """
    if num_max_tokens_per_rank <= 0 or hidden <= 0:
        raise ValueError(
            f"num_max_tokens_per_rank ({num_max_tokens_per_rank}) and hidden ({hidden}) must be > 0 "
            "to size a buffer (or pass num_bytes explicitly)"
        )
    if num_ranks <= 0:
        raise ValueError(f"num_ranks ({num_ranks}) must be > 0")
    k = num_topk if num_topk > 0 else 32
    elem = 1 if use_fp8_dispatch else 2
    num_sf_packs = -(-hidden // 32) if use_fp8_dispatch else 0
    dispatch_slot = align(hidden * elem, 32) + align(num_sf_packs * 4, 32) + align(12 * k + 4, 32)
    combine_slot = align(hidden * 2, 32) + align(8 * k, 32)
    T, S, amr = num_max_tokens_per_rank, num_scaleout_ranks, allow_multiple_reduction
    if num_ranks % S:
        raise ValueError(f"num_scaleout_ranks ({S}) must divide num_ranks ({num_ranks})")
    U = num_ranks // S
    if S > 1:  # hybrid: scale-up receive, scale-out send and receive (C: DeepEP's channel slack)
        C = 1280
        dispatch = dispatch_slot * (U * S * T + T + S * (T + C))
        combine = combine_slot * ((min(U, k) if amr else k) * S * T + (min(S, k) if amr else k) * T
                                  + (1 if amr else k) * S * (T + C))
    else:
        nvlink = num_nvlink_ranks is None or num_nvlink_ranks >= num_ranks
        dispatch = dispatch_slot * (num_ranks * T + (0 if nvlink else T))
        combine = combine_slot * ((min(num_ranks, k) if amr else k) * T
                                  + (0 if nvlink else num_ranks * T * (1 if amr else k)))
    # what tritonep's kernels use (over U ranks of S * T tokens in hybrid mode's stage B): the
    # expand-mode slot can exceed DeepEP's by 16 bytes for a few k; cover it too
    own = max(dispatch_bytes(U, S * T, hidden * elem, num_sf_packs, k, expand=True),
              combine_bytes(U, S * T, hidden, k, per_slot=not amr))
    return align(max(dispatch, combine, own), ALIGNMENT)


def dispatch_slot_offsets(row_bytes: int, num_sf_packs: int, num_topk: int, expand: bool = False
                         ) -> tuple[int, int, int]:
    """Byte offsets inside one dispatch receive slot: ``(off_sf, off_meta, slot_bytes)``.

    A slot holds ``[token row | sf packs | topk_idx (int32 x k) | topk_weights (f32 x k) |
    global source index (int32) | combine slot (int32) | expand mode: expert ranks (int32 x k)]``,
    each part 16-byte aligned.
    """
    off_sf = align(row_bytes, SLOT_ALIGN)
    off_meta = off_sf + align(num_sf_packs * 4, SLOT_ALIGN)
    meta_words = 2 * num_topk + 2 + (num_topk if expand else 0)
    slot_bytes = off_meta + align(meta_words * 4, SLOT_ALIGN)
    return off_sf, off_meta, slot_bytes


def dispatch_area(num_ranks: int, T: int, row_bytes: int, num_sf_packs: int, num_topk: int
                         ) -> tuple[int, int, int, int, int]:
    """The row dispatch's receive area (``kernels/dispatch.py``): row data and the rest apart,
    so that each source's received rows are one dense block (the copy engine then moves them with
    one plain copy). Returns byte sizes ``(row_pitch, aux_base, aux_pitch, off_sf, off_meta)``:
    slot ``g = source * T + slot`` holds its row at ``g * row_pitch`` and ``[sf packs | topk_idx |
    topk_weights | source index | combine slot]`` at ``aux_base + g * aux_pitch`` (parts at
    ``off_sf``, ``off_meta``). Same total as :func:`dispatch_bytes` (without expand mode)."""
    row_pitch = align(row_bytes, SLOT_ALIGN)
    off_meta = align(num_sf_packs * 4, SLOT_ALIGN)
    aux_pitch = off_meta + align((2 * num_topk + 2) * 4, SLOT_ALIGN)
    return row_pitch, num_ranks * T * row_pitch, aux_pitch, 0, off_meta


def combine_slot_offsets(hidden: int, num_topk: int) -> tuple[int, int]:
    """``(off_weights, slot_bytes)`` of one combine receive slot: ``[bf16 row | f32 weights x k]``."""
    off_w = align(hidden * 2, SLOT_ALIGN)
    return off_w, off_w + align(num_topk * 4, SLOT_ALIGN)


def dispatch_bytes(num_ranks: int, num_max_tokens_per_rank: int, row_bytes: int, num_sf_packs: int, num_topk: int,
                   expand: bool = False) -> int:
    """Receive area one dispatch needs: one region of T slots per source rank."""
    return num_ranks * num_max_tokens_per_rank * dispatch_slot_offsets(row_bytes, num_sf_packs, num_topk, expand)[2]


def combine_bytes(num_ranks: int, num_max_tokens_per_rank: int, hidden: int, num_topk: int,
                  per_slot: bool = False) -> int:
    """Receive area one combine needs: ``min(R, k)`` slots per token (one per contributing rank), or
    ``k`` when expanded rows travel without intermediate reduction."""
    slots = num_topk if per_slot else min(num_ranks, num_topk)
    return slots * num_max_tokens_per_rank * combine_slot_offsets(hidden, num_topk)[1]


#: words per source in the count area: tokens, per-local-expert counts, largest expert id, duplicate flag
COUNT_STRIDE = 3 + MAX_LOCAL_EXPERTS


def num_signal_words(num_ranks: int, flag_words: int = 0) -> int:
    """int32 words of the per-rank signal area: ready[R], freed[R], notified[R],
    counts[R][COUNT_STRIDE], over[R], announced[R] (a capped dispatch's verdicts,
    :func:`capacity_offsets`), then ``flag_words`` per source rank for the combine's block flags
    (the pipelined and the dense combine)."""
    return 5 * num_ranks + num_ranks * COUNT_STRIDE + num_ranks * flag_words


def signal_offsets(num_ranks: int) -> tuple[int, int, int, int, int]:
    """Word offsets of ``(ready, freed, notified, counts, flags)`` in the signal area."""
    return 0, num_ranks, 2 * num_ranks, 3 * num_ranks, 5 * num_ranks + num_ranks * COUNT_STRIDE


def capacity_offsets(num_ranks: int) -> tuple[int, int]:
    """Word offsets of ``(over, announced)``: in a dispatch with fewer output rows than its worst
    case, each rank writes into every peer ``over[rank]`` = the rows it needs if more than it has
    (else 0), then ``announced[rank] = seq``."""
    base = 3 * num_ranks + num_ranks * COUNT_STRIDE
    return base, base + num_ranks


def expected_recv_rows(num_ranks: int, num_max_tokens_per_rank: int, num_topk: int, num_experts: int,
                       expand: bool = False, expert_alignment: int = 1) -> float:
    """Rows one rank receives on average when every rank sends ``num_max_tokens_per_rank`` tokens
    whose ``num_topk`` experts are drawn uniformly without repetition: tokens (each once per rank
    that hosts one of its experts) or, expanded, (token, local expert) pairs plus the alignment
    padding of each local expert's rows (at most ``expert_alignment - 1`` each)."""
    R, T, k, E = num_ranks, num_max_tokens_per_rank, num_topk, num_experts
    L = E // R
    if expand:
        return T * k + (expert_alignment - 1) * L
    miss = 1.0  # the chance that none of a token's k experts is on a given rank
    for i in range(k):
        miss *= max(E - L - i, 0) / (E - i)
    return R * T * (1.0 - miss)


def recv_capacity(capacity_factor: float, num_ranks: int, num_max_tokens_per_rank: int, num_topk: int,
                  num_experts: int, expand: bool = False, expert_alignment: int = 1, per_expert: bool = False) -> int:
    """``num_max_recv_tokens`` for a capacity factor: ``capacity_factor`` times
    :func:`expected_recv_rows`, rounded up to a multiple of ``expert_alignment`` (expanded) or 4,
    and never more than the worst case (DeepEP's no-sync sizes, spec 2.7). With ``per_expert``:
    V1 low-latency dispatch's ``num_max_recv_tokens_per_expert``, ``capacity_factor`` times the
    rows one expert gets on average (``R*T*k/E``), rounded up to 4, at most ``R*T``."""
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
    R, T = num_ranks, num_max_tokens_per_rank
    if per_expert:
        rows = -(-math.ceil(capacity_factor * R * T * min(num_topk, num_experts) / num_experts) // 4) * 4
        return max(4, min(rows, R * T))
    rows = math.ceil(capacity_factor * expected_recv_rows(R, T, num_topk, num_experts, expand, expert_alignment))
    grain = expert_alignment if expand else 4
    rows = -(-rows // grain) * grain
    worst = (num_expanded_rows(None, R * T, num_topk, num_experts // R, expert_alignment) if expand else R * T)
    return max(1, min(rows, worst))


def num_expanded_rows(counts: list | None, worst_rows: int, num_topk: int, num_local_experts: int,
                      alignment: int) -> int:
    """Rows of an expand-mode output: exact from the host counts, else DeepEP's worst case."""
    if counts is not None:
        return sum((c + alignment - 1) // alignment * alignment for c in counts)
    worst = worst_rows * min(num_topk, num_local_experts) + (alignment - 1) * num_local_experts
    return (worst + alignment - 1) // alignment * alignment
