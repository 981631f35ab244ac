"""The pieces of the paged-attention kernels (unified_attention.py, decode_attention.py): the
tile loop (an online softmax over K/V tiles gathered through the block table), a split's share of
a q-block's tiles, the epilogue (normalised rows or a split's partials) and flash-decoding's
reduce of the splits.

Scores live in the log2 domain (scaled by log2(e)) so that the softmax takes exp2. A split's
partials stay unnormalised: (acc, m, l) per row, combined by the reduce kernel as
sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.grid import next_power_of_2
from atom.kernels.launch import launch, pdl, pdl_start


@triton.jit
def _softcap(x, cap):
    """cap * tanh(x / cap); tanh from exp2 (the interpreter and every Triton version have it).
    For large |x| exp2 saturates to inf or 0 and the formula to +-cap, never NaN."""
    e = tl.exp2((2.0 * 1.4426950408889634 / cap) * x)
    return cap - (2.0 * cap) / (e + 1.0)


@triton.jit
def _attend_tiles(
    acc,  # [BLOCK_M, HEAD_DIM_P] fp32, unnormalised output
    m_i,  # [BLOCK_M] running max of the log2-domain scores
    l_i,  # [BLOCK_M] running sum of exp2(score - m_i)
    q,  # [BLOCK_M, HEAD_DIM_P]
    tile_lo,
    tile_hi,
    k_base,
    v_base,
    bt_row,
    pos,  # [BLOCK_M] context position of each row's query token
    kv_hi,  # keys >= kv_hi are never read
    qk_scale,
    softcap,
    stride_kb,
    stride_ks,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,  # False: every row sees every key of these tiles
    DOT_PRECISION: tl.constexpr,
):
    offs_t = tl.arange(0, TILE)
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_ok = offs_d < HEAD_DIM
    for t in range(tile_lo, tile_hi):
        j = t * TILE + offs_t  # [TILE] key positions
        if MASKED:
            j_ok = j < kv_hi
            blk = tl.load(bt_row + j // BLOCK_SIZE, mask=j_ok, other=0)
        else:
            j_ok = offs_t < TILE
            blk = tl.load(bt_row + j // BLOCK_SIZE)
        off = blk.to(tl.int64) * stride_kb + (j % BLOCK_SIZE) * stride_ks  # [TILE]
        if MASKED or HEAD_DIM_P != HEAD_DIM:
            # Masked-out keys must load as 0, not as whatever a padded block holds: NaN * 0 = NaN.
            k = tl.load(
                k_base + off[None, :] + offs_d[:, None],
                mask=j_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            v = tl.load(
                v_base + off[:, None] + offs_d[None, :],
                mask=j_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
        else:
            k = tl.load(k_base + off[None, :] + offs_d[:, None])  # [HEAD_DIM_P, TILE]
            v = tl.load(v_base + off[:, None] + offs_d[None, :])  # [TILE, HEAD_DIM_P]
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION)  # [BLOCK_M, TILE] fp32
        if USE_SOFTCAP:
            s = _softcap(s * qk_scale, softcap) * 1.4426950408889634
        else:
            s = s * (qk_scale * 1.4426950408889634)
        if MASKED:
            seen = (j[None, :] <= pos[:, None]) & j_ok[None, :]
            if SLIDING_WINDOW > 0:
                seen &= j[None, :] > pos[:, None] - SLIDING_WINDOW
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no key yet keeps m = -inf; exponents then use 0 to avoid inf - inf.
        m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_exp[:, None])
        alpha = tl.exp2(m_i - m_exp)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION
        )
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attend_split(
    acc,  # [BLOCK_M, HEAD_DIM_P] fp32: the state before this split's tiles (zeros, -inf, zeros
    m_i,  # when nothing came before)
    l_i,
    q,  # [BLOCK_M, HEAD_DIM_P]
    tile_lo,  # the tiles holding keys of the q-block: [tile_lo, tile_hi)
    tile_hi,
    full_lo,  # tiles every row sees whole: [full_lo, full_hi)
    full_hi,
    split,
    num_splits,
    k_base,
    v_base,
    bt_row,
    pos,
    kv_hi,
    qk_scale,
    softcap,
    stride_kb,
    stride_ks,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(acc, m, l) after this split's share of the tiles: its masked head, unmasked middle and
    masked tail. acc is unnormalised and not yet times an fp8 cache's V scale."""
    n_tiles = tl.maximum(tile_hi - tile_lo, 0)
    per_split = tl.cdiv(n_tiles, num_splits)
    s_lo = tile_lo + tl.minimum(split * per_split, n_tiles)
    s_hi = tile_lo + tl.minimum(split * per_split + per_split, n_tiles)
    mid_lo = tl.minimum(tl.maximum(full_lo, s_lo), s_hi)
    mid_hi = tl.minimum(tl.maximum(full_hi, mid_lo), s_hi)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, s_lo, mid_lo, k_base, v_base, bt_row, pos, kv_hi, qk_scale, softcap,
        stride_kb, stride_ks, BLOCK_SIZE, TILE, HEAD_DIM, HEAD_DIM_P, SLIDING_WINDOW,
        USE_SOFTCAP, True, DOT_PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, mid_lo, mid_hi, k_base, v_base, bt_row, pos, kv_hi, qk_scale, softcap,
        stride_kb, stride_ks, BLOCK_SIZE, TILE, HEAD_DIM, HEAD_DIM_P, SLIDING_WINDOW,
        USE_SOFTCAP, False, DOT_PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, mid_hi, s_hi, k_base, v_base, bt_row, pos, kv_hi, qk_scale, softcap,
        stride_kb, stride_ks, BLOCK_SIZE, TILE, HEAD_DIM, HEAD_DIM_P, SLIDING_WINDOW,
        USE_SOFTCAP, True, DOT_PRECISION,
    )  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _finish(
    acc,  # [BLOCK_M, HEAD_DIM_P] unnormalised, V scale applied
    m_i,
    l_i,
    tok,  # [BLOCK_M] int64 query row of each row
    head,  # [BLOCK_M] query head of each row
    row_ok,
    split,
    num_splits,
    out_ptr,
    ws_acc_ptr,
    ws_m_ptr,
    ws_l_ptr,
    sinks_ptr,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    SPLIT: tl.constexpr,
    USE_SINKS: tl.constexpr,
):
    """A split's partials into the workspace, or the normalised rows into out."""
    offs_d = tl.arange(0, HEAD_DIM_P)
    d_ok = offs_d < HEAD_DIM
    if SPLIT:
        # Partials stay unnormalised: an empty split (l = 0, m = -inf) then weighs nothing.
        ws_row = (tok * NUM_HEADS + head) * num_splits + split
        tl.store(ws_m_ptr + ws_row, m_i, mask=row_ok)
        tl.store(ws_l_ptr + ws_row, l_i, mask=row_ok)
        tl.store(
            ws_acc_ptr + ws_row[:, None] * HEAD_DIM_P + offs_d[None, :], acc, mask=row_ok[:, None]
        )
    else:
        if USE_SINKS:
            # The sink joins the denominator once, after every key: it has no value, so it only
            # rescales. It is a raw logit (not times the softmax scale), hence just * log2(e).
            sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
            m_new = tl.maximum(m_i, sink)
            # A -inf sink on a row with no keys: as in _attend_tiles, avoid inf - inf.
            m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_exp)
            l_i = l_i * alpha + tl.exp2(sink - m_exp)
            acc = acc * alpha[:, None]
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # a row with no keys writes zeros
        tl.store(
            out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


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
    pdl_start(PDL)
    tok = tl.program_id(0)
    head = tl.program_id(1)
    if tok >= tl.load(qsl_ptr + num_seqs):  # padding tokens after the last sequence
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


Workspace = tuple[Tensor, Tensor, Tensor]  # a split's unnormalised acc, running max and sum


def split_workspace(query: Tensor, num_splits: int, head_dim_p: int) -> Workspace:
    """[T, H, splits, HEAD_DIM_P] acc and [T, H, splits] m and l, float32; stand-ins unsplit."""
    if num_splits == 1:
        m = torch.empty((1,), **_f32(query))
        return torch.empty((1,), **_f32(query)), m, torch.empty_like(m)
    shape = (*query.shape[:2], num_splits)
    m = torch.empty(shape, **_f32(query))
    return torch.empty((*shape, head_dim_p), **_f32(query)), m, torch.empty_like(m)


def reduce_splits(
    out: Tensor,
    workspace: Workspace,
    query_start_loc: Tensor,
    num_splits: int,
    sinks: Tensor | None,
) -> None:
    """Every query row of out [T, H, D] from its splits' partials (rows past the last
    sequence's are left untouched)."""
    ws_acc, ws_m, ws_l = workspace
    num_tokens, num_heads, head_dim = out.shape
    launch(
        _reduce_splits_kernel, (num_tokens, num_heads),
        out, ws_acc, ws_m, ws_l, ws_m if sinks is None else sinks, query_start_loc,
        query_start_loc.shape[0] - 1, num_splits, out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_P=ws_acc.shape[-1],
        SPLITS_P=next_power_of_2(num_splits), USE_SINKS=sinks is not None, PDL=pdl(out),
        num_warps=4,
    )  # fmt: skip


def _f32(like: Tensor) -> dict:
    return {"dtype": torch.float32, "device": like.device}
