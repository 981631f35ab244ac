"""Decode attention with the step's rotary embedding and cache write fused in.

A decode step's attention layer with a rope ran two kernels per layer: rotary_and_cache (the
per-head q/k RMSNorm where the model has one, the rotation, k and v into the paged cache, q back
to memory) and the paged attention. Here one kernel does both, for batches of one query token per
sequence (row i is sequence i, as the runner builds decode batches; padding rows have seq_len 0
and slot -1):

    program (sequence, KV head, split)
      q of the GROUP query heads: loaded unrotated, normed, rotated and rounded to the model
        dtype as rotary_and_cache writes it, kept in registers;
      the last split: this step's k rotated, k and v written into their slot (fp8: scaled), and
        the new key's score and value start its softmax, from registers (nothing reads what
        it wrote; done before the tile loop, so none of it stays live through the loop: 155
        registers a thread on sm90, as unified_attention's 158, not 195-200 when done after);
      then its share of the cached keys (positions < seq_len - 1), as unified_attention reads
        them.

The new key comes first in the softmax, so sums round in another order than the two kernels'
(the same values within rounding). Splits, tiles and the reduce are unified_attention's
(attention_config.py, attention_parts.py). The torch reference is the chain of
rotary_and_cache_ref and paged_attention_ref (decode_attention_ref).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.attention_config import choose_num_splits, launch_config, num_sms
from atom.kernels.attention_parts import (
    _attend_split,
    _finish,
    _softcap,
    reduce_splits,
    split_workspace,
)
from atom.kernels.grid import next_power_of_2
from atom.kernels.launch import launch, pdl, pdl_start
from atom.kernels.paged_attention import FP8_DTYPES, paged_attention_ref
from atom.kernels.rotary import Norm, _normed, rotary_and_cache_ref


@triton.jit
def _rope_rows(
    base,  # [R, 1] pointers: each row's first feature
    rows_ok,  # [R]
    cs_row,  # the position's row of the cos/sin cache: [cos | sin], rotary_dim floats
    w_ptr,  # the per-head RMSNorm weight [head_dim] (HAS_NORM only)
    eps,
    rotary_dim,
    ty: tl.constexpr,  # the model dtype: values round where rotary_and_cache rounds them
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    IS_NEOX: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    """Rows of one token's heads, normed (with HAS_NORM) and rotated, float32 values of ty.

    Feature d pairs with its partner (neox: d +- rotary_dim / 2; gpt-j: d ^ 1): the first of a
    pair becomes x cos - x' sin, the second x cos + x' sin; features past rotary_dim pass."""
    d = tl.arange(0, HEAD_DIM_P)
    half = rotary_dim // 2
    d_ok = d < HEAD_DIM
    rot = d < rotary_dim
    if IS_NEOX:
        first = d < half
        partner = tl.where(first, d + half, d - half)
        freq = tl.where(first, d, d - half)
    else:
        first = d % 2 == 0
        partner = d ^ 1
        freq = d // 2
    x = tl.load(base + d[None, :], mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    x = x.to(tl.float32)
    xp = tl.load(base + partner[None, :], mask=rows_ok[:, None] & rot[None, :], other=0.0)
    xp = xp.to(tl.float32)
    if HAS_NORM:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        x = _normed(x, rstd, w_ptr, d[None, :], d_ok[None, :], ty)
        xp = _normed(xp, rstd, w_ptr, partner[None, :], rot[None, :], ty)
    cos = tl.load(cs_row + freq, mask=rot, other=0.0)[None, :]
    sin = tl.load(cs_row + half + freq, mask=rot, other=0.0)[None, :]
    y = tl.where(first[None, :], x * cos - xp * sin, x * cos + xp * sin)
    return tl.where(rot[None, :], y, x).to(ty).to(tl.float32)


@triton.jit
def _as_cached(x, scale, fp8_max, cache_ty: tl.constexpr, IS_FP8: tl.constexpr):
    """x (float32 values of the model dtype) as the cache stores it: fp8 clamp(x / scale) with
    IEEE division, as reshape_and_cache writes it."""
    if IS_FP8:
        x = tl.clamp(tl.math.div_rn(x, scale), -fp8_max, fp8_max)
    return x.to(cache_ty)


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_attention_kernel(
    out_ptr,  # [B, H, D]
    q_ptr,  # [B, H, D] unrotated
    k_new_ptr,  # [B, H_kv, D] unrotated
    v_new_ptr,  # [B, H_kv, D]
    k_ptr,  # [num_blocks, block_size, H_kv, D]: the cache's keys
    v_ptr,  # and values
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32, this step's token included; 0 = padding row
    pos_ptr,  # [B] position of each row's token
    slot_ptr,  # [B] its cache slot, < 0: not written
    cos_sin_ptr,  # [max_position, rotary_dim] float32
    q_w_ptr,  # per-head RMSNorm weights [D] (HAS_NORM only)
    k_w_ptr,
    ws_acc_ptr,  # split partials (SPLIT only), as unified_attention's
    ws_m_ptr,
    ws_l_ptr,
    sinks_ptr,  # [H] fp32 sink logits (USE_SINKS only)
    qk_scale,  # softmax scale * k_scale
    softcap,
    k_scale,
    v_scale,
    eps,
    fp8_max,
    num_splits,
    rotary_dim,
    stride_qt,
    stride_qh,
    stride_knt,
    stride_knh,
    stride_vnt,
    stride_vnh,
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
    TILE: tl.constexpr,
    SPLIT: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINKS: tl.constexpr,
    KV_FP8: tl.constexpr,
    IS_NEOX: tl.constexpr,
    HAS_NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    split = tl.program_id(2)
    # Heads fastest, programs in batch order (longest context first): as unified_attention.
    seq = tl.program_id(0) // (NUM_HEADS // GROUP)
    kv_head = tl.program_id(0) % (NUM_HEADS // GROUP)
    tok = seq.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + seq)
    context = tl.maximum(seq_len - 1, 0)  # keys in the cache before this step's

    offs_m = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = offs_m < GROUP
    ty = q_ptr.dtype.element_ty
    cs_row = cos_sin_ptr + tl.load(pos_ptr + tok).to(tl.int64) * rotary_dim
    q = _rope_rows(
        q_ptr + tok * stride_qt + head[:, None] * stride_qh, row_ok, cs_row, q_w_ptr, eps,
        rotary_dim, ty, HEAD_DIM, HEAD_DIM_P, IS_NEOX, HAS_NORM,
    )  # fmt: skip
    if KV_FP8:
        # As unified_attention: fp16 dots on a pre-scaled query (fp8 -> fp16 is one conversion).
        q = (q * qk_scale).to(tl.float16)
        qk_scale = 1.0
    else:
        q = q.to(ty)

    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if (split == num_splits - 1) & (seq_len > 0):
        # This step's key and value (one row, broadcast over the group's rows) start the last
        # split's softmax, before the tiles: nothing stays live across the tile loop for them.
        one = tl.zeros([1], dtype=tl.int64)
        k = _rope_rows(
            k_new_ptr + tok * stride_knt + kv_head * stride_knh + one[:, None], one == 0, cs_row,
            k_w_ptr, eps, rotary_dim, ty, HEAD_DIM, HEAD_DIM_P, IS_NEOX, HAS_NORM,
        )  # fmt: skip
        offs_d = tl.arange(0, HEAD_DIM_P)
        d_ok = offs_d < HEAD_DIM
        v = tl.load(
            v_new_ptr + tok * stride_vnt + kv_head * stride_vnh + one[:, None] + offs_d[None, :],
            mask=d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        cache_ty = k_ptr.dtype.element_ty
        k_c = _as_cached(k, k_scale, fp8_max, cache_ty, KV_FP8)
        v_c = _as_cached(v, v_scale, fp8_max, cache_ty, KV_FP8)
        slot = tl.load(slot_ptr + tok)
        # A negative slot writes nothing (a row bound in the mask, not a scalar condition: the
        # interpreter rejects those).
        w_mask = (one == tl.where(slot >= 0, 0, 1))[:, None] & d_ok[None, :]
        at = (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_ks
        at += kv_head * stride_kh + one[:, None] + offs_d[None, :]
        tl.store(k_ptr + at, k_c, mask=w_mask)
        tl.store(v_ptr + at, v_c, mask=w_mask)
        # Its score as the tile loop would take it from the cache; its weight is 2^0 = 1.
        s = tl.sum(q.to(tl.float32) * k_c.to(q.dtype).to(tl.float32), axis=1)
        if USE_SOFTCAP:
            m_i = _softcap(s * qk_scale, softcap) * 1.4426950408889634
        else:
            m_i = s * (qk_scale * 1.4426950408889634)
        l_i += 1.0
        acc += v_c.to(q.dtype).to(tl.float32)

    if SLIDING_WINDOW > 0:
        tile_lo = tl.maximum(context - SLIDING_WINDOW + 1, 0) // TILE
        full_lo = tl.cdiv(tl.maximum(context - SLIDING_WINDOW + 1, 0), TILE)
    else:
        tile_lo = 0
        full_lo = 0
    pos = tl.zeros([BLOCK_M], dtype=tl.int32) + context  # the query's position
    acc, m_i, l_i = _attend_split(
        acc, m_i, l_i, q, tile_lo, tl.cdiv(context, TILE), full_lo, context // TILE, split,
        num_splits, k_ptr + kv_head * stride_kh, v_ptr + kv_head * stride_kh,
        block_tables_ptr + tok * stride_bt, pos, context, qk_scale, softcap, stride_kb,
        stride_ks, BLOCK_SIZE, TILE, HEAD_DIM, HEAD_DIM_P, SLIDING_WINDOW, USE_SOFTCAP,
        DOT_PRECISION,
    )  # fmt: skip
    rows = tok + tl.zeros([BLOCK_M], dtype=tl.int64)
    _finish(
        acc * v_scale, m_i, l_i, rows, head, row_ok, split, num_splits, out_ptr, ws_acc_ptr,
        ws_m_ptr, ws_l_ptr, sinks_ptr, stride_ot, stride_oh, NUM_HEADS, HEAD_DIM, HEAD_DIM_P,
        SPLIT, USE_SINKS,
    )  # fmt: skip


def decode_attention(
    query: Tensor,  # [B, H, D] unrotated (a view of the fused projection is fine)
    key: Tensor,  # [B, H_kv, D] unrotated
    value: Tensor,  # [B, H_kv, D]
    positions: Tensor,  # [B]
    kv_cache: Tensor,  # [2, num_blocks, block_size, H_kv, D]
    slot_mapping: Tensor,  # [B]: where this step's k and v go; < 0 not written
    block_tables: Tensor,  # [B, max_blocks] int32
    seq_lens: Tensor,  # [B] int32, this step's token included; 0 = padding row
    query_start_loc: Tensor,  # [B + 1] int32: 0, 1, ..., B (the split reduce reads it)
    max_seq_len: int,
    cos_sin_cache: Tensor,  # [max_position, rotary_dim] float32
    rotary_dim: int,
    is_neox_style: bool,
    norm: Norm | None,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: Tensor | None = None,
    sinks: Tensor | None = None,
    *,
    num_splits: int | None = None,  # None = choose_num_splits (tests force it)
) -> Tensor:
    """Attention of a decode batch (one query token per sequence, row i of sequence i) with the
    rotary embedding (after the per-head q/k norms of `norm`) and the cache write of this step's
    k and v in the same kernel: what rotary_and_cache and then unified_attention compute."""
    _check(query, key, value, positions, kv_cache, slot_mapping, block_tables, seq_lens)
    num_seqs, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    head_dim_p = max(16, next_power_of_2(head_dim))
    cfg = launch_config(1, group, head_dim_p)
    if num_splits is None:
        num_splits = choose_num_splits(
            num_seqs, num_kv_heads, 1, max_seq_len, num_sms(query.device)
        )
    workspace = split_workspace(query, num_splits, head_dim_p)
    split = num_splits > 1
    kv_fp8 = kv_cache.dtype in FP8_DTYPES
    dot_dtype = torch.float16 if kv_fp8 else query.dtype
    q_weight, k_weight, eps = norm if norm is not None else (query, key, 0.0)  # unread then
    launch(
        _decode_attention_kernel, (num_seqs * num_kv_heads, 1, num_splits),
        out, query, key, value, kv_cache[0], kv_cache[1], block_tables, seq_lens, positions,
        slot_mapping, cos_sin_cache.contiguous().float(), q_weight, k_weight, *workspace,
        workspace[1] if sinks is None else sinks,  # any fp32 pointer when unused
        scale * k_scale, softcap or 0.0, k_scale, v_scale, eps,
        torch.finfo(kv_cache.dtype).max if kv_fp8 else 0.0, num_splits, rotary_dim,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), out.stride(0), out.stride(1), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3), block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
        BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m, TILE=cfg.tile, SPLIT=split,
        SLIDING_WINDOW=sliding_window or 0, USE_SOFTCAP=softcap is not None,
        USE_SINKS=sinks is not None and not split, KV_FP8=kv_fp8, IS_NEOX=is_neox_style,
        HAS_NORM=norm is not None,
        DOT_PRECISION="ieee" if dot_dtype == torch.float32 else "tf32", PDL=pdl(query),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split:
        reduce_splits(out, workspace, query_start_loc, num_splits, sinks)
    return out


def decode_attention_ref(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    positions: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: list[int],
    cos_sin_cache: Tensor,
    rotary_dim: int,
    is_neox_style: bool,
    norm: Norm | None,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """rotary_and_cache_ref, then paged_attention_ref over the decode batch (padding rows of
    seq_len 0 come out as zeros)."""
    args = (cos_sin_cache, rotary_dim, is_neox_style, k_scale, v_scale, norm)
    q = rotary_and_cache_ref(positions, query, key, value, kv_cache, slot_mapping, *args)
    qsl = list(range(len(seq_lens) + 1))
    return paged_attention_ref(
        q, kv_cache, block_tables, seq_lens, qsl, scale, k_scale, v_scale, sliding_window,
        softcap, sinks,
    )  # fmt: skip


def _check(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    positions: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
) -> None:
    """Shapes, dtypes and strides only: reading values would cost a host sync."""
    num_seqs, num_heads, head_dim = query.shape
    kv_shape = (num_seqs, *kv_cache.shape[3:])
    fits = key.shape == value.shape == kv_shape and head_dim == kv_shape[2]
    if not fits or num_heads % kv_shape[1]:
        raise ValueError(
            f"query {tuple(query.shape)}, key {tuple(key.shape)} and value "
            f"{tuple(value.shape)} do not fit the cache {tuple(kv_cache.shape)}"
        )
    rows = (num_seqs,)
    if positions.shape != rows or slot_mapping.shape != rows or seq_lens.shape != rows:
        raise ValueError(f"positions, slots and seq_lens need one entry per row: {num_seqs}")
    if block_tables.shape[0] != num_seqs or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32 [{num_seqs}, blocks]")
    if seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32, got {seq_lens.dtype}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension")
    if not kv_cache.is_contiguous() or block_tables.stride(1) != 1:
        raise ValueError("kv_cache must be contiguous, block_tables rows too")
