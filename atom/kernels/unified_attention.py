"""Paged attention for any batch the scheduler makes, in Triton: prefill, chunked prefill,
prefix-cache hits and decode in one kernel, plus a split-KV (flash-decoding) pass for small decode
batches over long contexts. The torch reference is `paged_attention_ref` in paged_attention.py.

Work split. Axis 0 of the grid walks q-blocks (up to BLOCK_Q query tokens of one sequence), axis 1
the KV heads, axis 2 the KV splits. A program multiplies its BLOCK_M = BLOCK_Q * GROUP rows (every
query head that shares the KV head) against each K/V tile, so a tile is loaded once per group:

    query rows  | seq 0: 40 tokens          | seq 1: 1 | seq 2: 70 tokens                 |
    q-blocks    | qb 0 (32)   | qb 1 (8)    | qb 0 (1) | qb 0 (32) | qb 1 (32) | qb 2 (6) |
    BLOCK_M row m -> query token m // GROUP of the q-block, query head kv_head * GROUP + m % GROUP

Sequence i's first q-block is program qsl[i] // BLOCK_Q + i, so T // BLOCK_Q + B programs always
suffice; each finds its sequence by binary search over query_start_loc and programs past a
sequence's last q-block exit. The grid depends only on shapes and Python ints: no host sync, and a
CUDA graph replays the same launches. When every sequence fits in one q-block (decode, short
speculative steps), axis 0 walks (sequence, KV head) pairs, heads fastest, and no search is
needed: programs launch in batch order, which a decode step sorts longest context first, so the
longest programs start first and the last wave is the shortest (H200 sweep: RESULTS.md).

A K/V tile is TILE tokens, i.e. several pages: each token's block id comes from the block table:

    token j -> kv_cache[0 or 1, block_tables[i, j // block_size], j % block_size, kv_head, :]

Tiles past a q-block's last causal position or before its sliding window are never visited; tiles
every row of the q-block sees completely skip the mask arithmetic. How a program walks its tiles
(pointer gathers, or for large decodes whole blocks copied through descriptors) is
attention_tiles.py's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.attention_config import (
    DO_NOT_SPECIALIZE,
    choose_num_splits,
    launch_config,
    num_sms,
    padded_head_dim,
    pointer_decode,
)
from atom.kernels.attention_tiles import attend, kv_descriptors
from atom.kernels.grid import next_power_of_2
from atom.kernels.launch import launch, pdl, pdl_start
from atom.kernels.paged_attention import FP8_DTYPES
from atom.kernels.split_kv import split_workspace, store_rows


@triton.jit
def _find_seq(qsl_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence i whose first q-block (qsl[i] // BLOCK_Q + i) is <= q_block."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
def _unified_attention_kernel(
    out_ptr,  # [T, H, D]
    q_ptr,  # [T, H, D]
    k_ptr,  # [num_blocks, block_size, H_kv, D]
    v_ptr,  # [num_blocks, block_size, H_kv, D]
    k_desc,  # KV_DESC: descriptors of k's and v's [BLOCK_SIZE, HEAD_DIM] tiles, else unused
    v_desc,
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    qsl_ptr,  # [B + 1] int32
    ws_acc_ptr,  # [T, H, num_splits, HEAD_DIM_P] fp32 (SPLIT only)
    ws_m_ptr,  # [T, H, num_splits] fp32
    ws_l_ptr,  # [T, H, num_splits] fp32
    sinks_ptr,  # [H] fp32 sink logits (USE_SINKS only)
    qk_scale,  # softmax scale * k_scale
    softcap,
    v_scale,
    num_seqs,
    num_splits,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE: tl.constexpr,
    ONE_BLOCK_PER_SEQ: tl.constexpr,
    SPLIT: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINKS: tl.constexpr,
    KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_DESC: tl.constexpr,
    PDL: tl.constexpr,
):
    # query_start_loc and seq_lens are step inputs, uploaded before the step's first kernel and
    # written by none: read before the PDL wait, their chain of loads runs while the kernel before
    # drains. Everything else (q, this step's K/V, the block tables) is read after it.
    split = tl.program_id(2)
    if ONE_BLOCK_PER_SEQ:
        # Heads fastest: a sequence's KV heads run side by side (they read the same pages), and
        # the batch order (longest context first, build_step_inputs) is the launch order.
        seq = tl.program_id(0) // (NUM_HEADS // GROUP)
        kv_head = tl.program_id(0) % (NUM_HEADS // GROUP)
        q_block = 0
    else:
        kv_head = tl.program_id(1)
        # Last program first: later q-blocks of a causal prefill have the most tiles.
        pid = tl.num_programs(0) - 1 - tl.program_id(0)
        seq = _find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q)
        q_block = pid - (tl.load(qsl_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    pdl_start(PDL)  # before any return: a grid whose programs all skipped it would not wait
    if q_block * BLOCK_Q >= q_len:
        return
    context = seq_len - q_len  # tokens cached before this step's queries

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    q_local = q_block * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m // GROUP < BLOCK_Q) & (q_local < q_len)
    d_ok = offs_d < HEAD_DIM
    tok = (q_start + q_local).to(tl.int64)
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    pos = context + q_local
    if KV_FP8:
        # fp8 -> fp16 is a single conversion on Hopper, fp8 -> bf16 is not (measured: decode 2.9
        # vs 2.2 TB/s): run both dots in fp16, on a query pre-scaled so that a bf16 query cannot
        # overflow fp16.
        q = (q.to(tl.float32) * qk_scale).to(tl.float16)
        qk_scale = 1.0

    # Key range of the whole q-block, in tiles; `full` tiles are seen by every row.
    first = context + q_block * BLOCK_Q
    last = context + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_hi = tl.maximum(tl.minimum(last + 1, seq_len), 0)
    if SLIDING_WINDOW > 0:
        tile_lo = tl.maximum(first - SLIDING_WINDOW + 1, 0) // TILE
        full_lo = tl.cdiv(tl.maximum(last - SLIDING_WINDOW + 1, 0), TILE)
    else:
        tile_lo = 0
        full_lo = 0
    tile_hi = tl.cdiv(kv_hi, TILE)
    full_hi = tl.maximum(first + 1, 0) // TILE
    # This split's share of the tiles, then its masked head, unmasked middle and masked tail.
    n_tiles = tl.maximum(tile_hi - tile_lo, 0)
    per_split = tl.cdiv(n_tiles, num_splits)
    s_lo = tile_lo + tl.minimum(split * per_split, n_tiles)
    s_hi = tile_lo + tl.minimum(split * per_split + per_split, n_tiles)
    mid_lo = tl.minimum(tl.maximum(full_lo, s_lo), s_hi)
    mid_hi = tl.minimum(tl.maximum(full_hi, mid_lo), s_hi)

    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_kh
    kv_col = kv_head * HEAD_DIM  # KV_DESC: a [tokens, H_kv * D] view's column
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = attend(
        acc, m_i, l_i, q, s_lo, mid_lo, k_base, v_base, k_desc, v_desc, kv_col, bt_row, pos, kv_hi,
        qk_scale, softcap, stride_kb, stride_ks, BLOCK_SIZE, TILE, HEAD_DIM, HEAD_DIM_P,
        SLIDING_WINDOW, USE_SOFTCAP, True, DOT_PRECISION, KV_DESC,
    )  # fmt: skip
    acc, m_i, l_i = attend(
        acc, m_i, l_i, q, mid_lo, mid_hi, k_base, v_base, k_desc, v_desc, kv_col, bt_row, pos,
        kv_hi, qk_scale, softcap, stride_kb, stride_ks, BLOCK_SIZE, TILE, HEAD_DIM, HEAD_DIM_P,
        SLIDING_WINDOW, USE_SOFTCAP, False, DOT_PRECISION, KV_DESC,
    )  # fmt: skip
    acc, m_i, l_i = attend(
        acc, m_i, l_i, q, mid_hi, s_hi, k_base, v_base, k_desc, v_desc, kv_col, bt_row, pos, kv_hi,
        qk_scale, softcap, stride_kb, stride_ks, BLOCK_SIZE, TILE, HEAD_DIM, HEAD_DIM_P,
        SLIDING_WINDOW, USE_SOFTCAP, True, DOT_PRECISION, KV_DESC,
    )  # fmt: skip
    acc = acc * v_scale  # an fp8 cache's V scale, applied once instead of per loaded element

    if USE_SINKS:  # unsplit only: a split's sinks join in the reduce
        # The sink joins the denominator once, after every key: it has no value, so it only
        # rescales. It is a raw logit (not times the softmax scale), hence just * log2(e).
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m_i, sink)
        # A -inf sink on a row with no keys: as in _attend_tiles, avoid inf - inf.
        m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_exp)
        l_i = l_i * alpha + tl.exp2(sink - m_exp)
        acc = acc * alpha[:, None]
    store_rows(
        out_ptr, ws_acc_ptr, ws_m_ptr, ws_l_ptr, acc, m_i, l_i, tok, head, offs_d, row_ok, d_ok,
        split, num_splits, stride_ot, stride_oh, NUM_HEADS, HEAD_DIM_P, SPLIT,
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _reduce_splits_kernel(
    out_ptr,  # [T, H, D]
    ws_acc_ptr,  # [T, H, num_splits, HEAD_DIM_P]
    ws_m_ptr,  # [T, H, num_splits]
    ws_l_ptr,  # [T, H, num_splits]
    sinks_ptr,  # [H] fp32 (USE_SINKS only)
    qsl_ptr,
    num_seqs,
    num_splits,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    SPLITS_P: tl.constexpr,
    USE_SINKS: tl.constexpr,
    PDL: tl.constexpr,
):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    num_tokens = tl.load(qsl_ptr + num_seqs)  # a step input: read before the PDL wait
    pdl_start(PDL)
    if tok >= num_tokens:  # padding tokens after the last sequence
        return
    offs_s = tl.arange(0, SPLITS_P)
    offs_d = tl.arange(0, HEAD_DIM_P)
    s_ok = offs_s < num_splits
    row = (tok.to(tl.int64) * NUM_HEADS + head) * num_splits + offs_s
    m = tl.load(ws_m_ptr + row, mask=s_ok, other=float("-inf"))
    lsum = tl.load(ws_l_ptr + row, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    if USE_SINKS:
        # Once per row, after combining the splits (log2 domain, raw logit: not scaled).
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        m_max = tl.maximum(m_max, sink)
    m_exp = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_exp)  # [SPLITS_P]
    denom = tl.sum(w * lsum, axis=0)
    if USE_SINKS:
        denom += tl.exp2(sink - m_exp)
    acc = tl.load(
        ws_acc_ptr + row[:, None] * HEAD_DIM_P + offs_d[None, :], mask=s_ok[:, None], other=0.0
    )
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(
        out_ptr + tok * stride_ot + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


def unified_attention(
    query: Tensor,  # [T, H, D]
    kv_cache: Tensor,  # [2, num_blocks, block_size, H_kv, D]
    block_tables: Tensor,  # [B, max_blocks] int32 (rows may be padded with 0)
    seq_lens: Tensor,  # [B] int32: context length incl. this step's tokens; 0 = padding row
    query_start_loc: Tensor,  # [B + 1] int32: sequence i owns query rows [qsl[i], qsl[i+1])
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    sliding_window: int | None = None,  # key j visible to query at position p iff p - W < j <= p
    softcap: float | None = None,  # scores = softcap * tanh(scores / softcap) before masking
    out: Tensor | None = None,  # [T, H, D] written in place when given
    sinks: Tensor | None = None,  # [H] logits joining each softmax denominator, no value (GPT-OSS)
    *,
    num_splits: int | None = None,  # KV splits; None = choose_num_splits (tests force it)
) -> Tensor:
    """Causal attention of every query row over its sequence's paged K/V (its own K/V included).

    Query row r of sequence i sits at position seq_lens[i] - q_len + (r - qsl[i]). Rows of a
    sequence with seq_len 0 are written as zeros; rows after qsl[B] are left untouched.
    A sink s_h is a raw logit (not multiplied by scale): row weights are softmax([scores, s_h])
    without the last entry.
    """
    _check_inputs(query, kv_cache, block_tables, seq_lens, query_start_loc, out, sinks)
    num_tokens, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_seqs = block_tables.shape[0]
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    head_dim_p = padded_head_dim(head_dim)
    sms = num_sms(query.device)
    cfg = launch_config(max_query_len, group, head_dim_p, num_seqs * num_kv_heads, max_seq_len, sms)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_query_len, max_seq_len, sms)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    split = num_splits > 1
    kv_fp8 = kv_cache.dtype in FP8_DTYPES
    dot_dtype = torch.float16 if kv_fp8 else query.dtype  # fp32: exact dots, not tf32
    ws_acc, ws_m, ws_l = split_workspace(num_tokens, num_heads, num_splits, head_dim_p, query)
    # Descriptor tiles serve decodes only (one query a sequence: the variant measured and run on
    # the GPU; a forced prefill variant hung there, triton 3.6).
    decode = cfg.one_block_per_seq and max_query_len == 1
    descs = kv_descriptors(kv_cache, cfg.tile) if cfg.kv_desc and decode else None
    if cfg.kv_desc and descs is None:  # a block size or layout the descriptor tiles do not fit
        cfg = pointer_decode(cfg.block_m, cfg.block_q, head_dim_p)
    if cfg.one_block_per_seq:
        grid = (num_seqs * num_kv_heads, 1, num_splits)
    else:
        grid = (num_tokens // cfg.block_q + num_seqs, num_kv_heads, num_splits)
    launch(
        _unified_attention_kernel, grid,
        out, query, kv_cache[0], kv_cache[1], *(descs or (kv_cache[0], kv_cache[1])),
        block_tables, seq_lens, query_start_loc,
        ws_acc, ws_m, ws_l, ws_m if sinks is None else sinks,  # any fp32 pointer when unused
        scale * k_scale, softcap or 0.0, v_scale, num_seqs, num_splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
        BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m, BLOCK_Q=cfg.block_q, TILE=cfg.tile,
        ONE_BLOCK_PER_SEQ=cfg.one_block_per_seq, SPLIT=split,
        SLIDING_WINDOW=sliding_window or 0, USE_SOFTCAP=softcap is not None,
        USE_SINKS=sinks is not None and not split, KV_FP8=kv_fp8,  # split: in the reduce
        DOT_PRECISION="ieee" if dot_dtype == torch.float32 else "tf32", KV_DESC=descs is not None,
        PDL=pdl(query), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
    )  # fmt: skip
    if split:
        launch(
            _reduce_splits_kernel, (num_tokens, num_heads),
            out, ws_acc, ws_m, ws_l, ws_m if sinks is None else sinks, query_start_loc,
            num_seqs, num_splits, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
            SPLITS_P=next_power_of_2(num_splits), USE_SINKS=sinks is not None, PDL=pdl(query),
            num_warps=4,
        )  # fmt: skip
    return out


def _check_inputs(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    out: Tensor | None,
    sinks: Tensor | None = None,
) -> None:
    """Shapes and dtypes only: reading values would cost a host sync."""
    if query.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"want query [T, H, D] and kv_cache [2, blocks, block_size, H_kv, D], got "
            f"{tuple(query.shape)} and {tuple(kv_cache.shape)}"
        )
    num_heads, head_dim = query.shape[1:]
    num_kv_heads, cache_dim = kv_cache.shape[3:]
    if cache_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(
            f"query heads x dim {num_heads} x {head_dim} do not fit the cache's "
            f"{num_kv_heads} x {cache_dim}"
        )
    num_seqs = block_tables.shape[0]
    if seq_lens.shape != (num_seqs,) or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(
            f"{num_seqs} block-table rows want seq_lens [{num_seqs}] and query_start_loc "
            f"[{num_seqs + 1}], got {tuple(seq_lens.shape)} and {tuple(query_start_loc.shape)}"
        )
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if query_start_loc.dtype != torch.int32:
        raise ValueError(f"query_start_loc must be int32, got {query_start_loc.dtype}")
    if query.stride(2) != 1 or kv_cache.stride(4) != 1 or block_tables.stride(1) != 1:
        raise ValueError("query, kv_cache and block_tables need a contiguous last dimension")
    if out is not None and (out.shape != query.shape or out.stride(2) != 1):
        raise ValueError(
            f"out must be {tuple(query.shape)} with a contiguous last dimension, "
            f"got {tuple(out.shape)}"
        )
    if sinks is not None and (sinks.shape != (num_heads,) or sinks.stride(0) != 1):
        raise ValueError(f"sinks must be contiguous [{num_heads}], got {tuple(sinks.shape)}")
