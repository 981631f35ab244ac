"""MLA attention over the paged latent cache in Triton (DeepSeek-V2/V3): every query row of a batch
(decode, chunked prefill over a cached prefix, whole prompts) in the absorbed form, with a split-KV
(flash-decoding) pass for small decode batches over long contexts. Oracles: mla_reference.py.

One cache row per token, shared by every head (R = kv_lora_rank, P = qk_rope_head_dim):

    kv_cache [1, num_blocks, block_size, 1, R + P]    row = c_kv | k_pe
    key j of sequence i -> kv_cache[0, block_tables[i, j // block_size], j % block_size, 0, :]

With W_UK absorbed into the query (q_lat = q_nope W_UK) head h's score for key j is
scale * (q_lat[h] . c_kv[j] + q_pe[h] . k_pe[j]) and its output, still latent, softmax . c_kv:
the same rows are keys and values, so a tile is loaded once for both dots.

Work split. As in unified_attention.py with a single KV head: a program's BLOCK_M rows are up to
BLOCK_Q query tokens x HEAD_GROUP heads, the M dimension of both tl.dot, so all the heads of a
token share each latent tile read. Grid: (q-blocks, head groups, KV splits); launch shapes come
from Python ints only, so a captured CUDA graph replays the same launches.

    BLOCK_M row m -> token q_block * BLOCK_Q + m // HEAD_GROUP, head g * HEAD_GROUP + m % HEAD_GROUP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.attention_config import DO_NOT_SPECIALIZE, choose_num_splits, num_sms
from atom.kernels.grid import cdiv, next_power_of_2
from atom.kernels.paged_attention import FP8_DTYPES
from atom.kernels.split_kv import split_workspace, store_rows
from atom.kernels.unified_attention import _find_seq

# The fp32 accumulator is [BLOCK_M, R]: at R = 512, 16 rows fill 64 registers of each of 4 warps'
# threads, 32 rows those of 8 warps. Untuned: no GPU measurement of this kernel yet.
MAX_HEAD_GROUP = 16
DECODE_ROWS, PREFILL_ROWS = 16, 32
TILE = 32  # latent rows (1.1 KiB each at V3's shape) per loop iteration

# choose_num_splits's fill_twice: the two-split band of the unified kernel was measured on it
# alone (RESULTS, fourteenth sitting), so the latent kernel keeps a batch that covers every SM
# once unsplit. MLAAttention reads it too, for the graphs' context caps.
SPLITS_FILL_TWICE = False


@dataclass(frozen=True, slots=True)
class MLALaunchConfig:
    head_group: int  # heads of one program
    num_head_groups: int
    block_m: int
    block_q: int  # query tokens of one program
    one_block_per_seq: bool
    num_warps: int


def mla_launch_config(max_query_len: int, num_heads: int) -> MLALaunchConfig:
    """From Python ints only. Decode rows take one token x up to 16 heads (V2-Lite, V3 at TP 8:
    all of them); more heads split into balanced groups that each read the latents."""
    groups = cdiv(num_heads, MAX_HEAD_GROUP)
    head_group = cdiv(num_heads, groups)
    if max(max_query_len, 1) * head_group <= DECODE_ROWS:
        return MLALaunchConfig(head_group, groups, DECODE_ROWS, DECODE_ROWS // head_group, True, 4)
    block_q = PREFILL_ROWS // head_group
    return MLALaunchConfig(head_group, groups, PREFILL_ROWS, block_q, max_query_len <= block_q, 8)


@triton.jit
def _attend_latent_tiles(
    acc,  # [BLOCK_M, RANK_P] fp32, unnormalised latent output
    m_i,  # [BLOCK_M] running max of the log2-domain scores
    l_i,  # [BLOCK_M] running sum of exp2(score - m_i)
    q_lat,  # [BLOCK_M, RANK_P]
    q_pe,  # [BLOCK_M, ROPE_P]
    tile_lo,
    tile_hi,
    cache_ptr,
    bt_row,
    pos,  # [BLOCK_M] context position of each row's query token
    kv_hi,  # keys >= kv_hi are never read
    qk_scale,
    stride_kb,
    stride_ks,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    RANK: tl.constexpr,
    RANK_P: tl.constexpr,
    ROPE: tl.constexpr,
    ROPE_P: tl.constexpr,
    MASKED: tl.constexpr,  # False: every row sees every key of these tiles
    DOT_PRECISION: tl.constexpr,
):
    offs_t = tl.arange(0, TILE)
    offs_r = tl.arange(0, RANK_P)
    offs_p = tl.arange(0, ROPE_P)
    r_ok = offs_r < RANK
    p_ok = offs_p < ROPE
    for t in range(tile_lo, tile_hi):
        j = t * TILE + offs_t  # [TILE] key positions
        if MASKED:
            j_ok = j < kv_hi
            blk = tl.load(bt_row + j // BLOCK_SIZE, mask=j_ok, other=0)
        else:
            j_ok = offs_t < TILE
            blk = tl.load(bt_row + j // BLOCK_SIZE)
        row = cache_ptr + blk.to(tl.int64) * stride_kb + (j % BLOCK_SIZE) * stride_ks  # [TILE]
        # Masked-out keys must load as 0, not as whatever a padded block holds: NaN * 0 = NaN.
        if MASKED or RANK_P != RANK:
            c = tl.load(
                row[:, None] + offs_r[None, :], mask=j_ok[:, None] & r_ok[None, :], other=0.0
            )
        else:
            c = tl.load(row[:, None] + offs_r[None, :])  # [TILE, RANK_P]
        if MASKED or ROPE_P != ROPE:
            pe = tl.load(
                row[:, None] + RANK + offs_p[None, :], mask=j_ok[:, None] & p_ok[None, :], other=0.0
            )
        else:
            pe = tl.load(row[:, None] + RANK + offs_p[None, :])  # [TILE, ROPE_P]
        c = c.to(q_lat.dtype)
        s = tl.dot(q_lat, tl.trans(c), input_precision=DOT_PRECISION)  # [BLOCK_M, TILE] fp32
        s = tl.dot(q_pe, tl.trans(pe.to(q_pe.dtype)), s, input_precision=DOT_PRECISION)
        s = s * (qk_scale * 1.4426950408889634)
        if MASKED:
            s = tl.where((j[None, :] <= pos[:, None]) & j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen no key yet keeps m = -inf; exponents then use 0 to avoid inf - inf.
        m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_exp[:, None])
        alpha = tl.exp2(m_i - m_exp)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
def _mla_attention_kernel(
    out_ptr,  # [T, H, R]
    q_lat_ptr,  # [T, H, R]
    q_pe_ptr,  # [T, H, P]
    cache_ptr,  # [num_blocks, block_size, R + P] (the cache's dims 0 and 3 have size 1)
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    qsl_ptr,  # [B + 1] int32
    ws_acc_ptr,  # [T, H, num_splits, RANK_P] fp32 (SPLIT only)
    ws_m_ptr,  # [T, H, num_splits] fp32
    ws_l_ptr,  # [T, H, num_splits] fp32
    qk_scale,  # softmax scale * kv_scale
    kv_scale,
    num_seqs,
    num_splits,
    stride_lt,
    stride_lh,
    stride_pt,
    stride_ph,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_ks,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    HEAD_GROUP: tl.constexpr,
    RANK: tl.constexpr,
    RANK_P: tl.constexpr,
    ROPE: tl.constexpr,
    ROPE_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE: tl.constexpr,
    ONE_BLOCK_PER_SEQ: tl.constexpr,
    SPLIT: tl.constexpr,
    KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    head_group = tl.program_id(1)
    split = tl.program_id(2)
    if ONE_BLOCK_PER_SEQ:
        seq = tl.program_id(0)
        q_block = 0
    else:
        # Last program first: later q-blocks of a causal prefill have the most tiles.
        pid = tl.num_programs(0) - 1 - tl.program_id(0)
        seq = _find_seq(qsl_ptr, pid, num_seqs, BLOCK_Q)
        q_block = pid - (tl.load(qsl_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # tokens cached before this step's queries

    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, RANK_P)
    offs_p = tl.arange(0, ROPE_P)
    q_local = q_block * BLOCK_Q + offs_m // HEAD_GROUP
    # int64: with the [H, T, R] layout of mla_paged_attention a head stride is T * R elements.
    head = (head_group * HEAD_GROUP + offs_m % HEAD_GROUP).to(tl.int64)
    row_ok = (offs_m // HEAD_GROUP < BLOCK_Q) & (q_local < q_len) & (head < NUM_HEADS)
    r_ok = offs_r < RANK
    tok = (q_start + q_local).to(tl.int64)
    q_lat = tl.load(
        q_lat_ptr + tok[:, None] * stride_lt + head[:, None] * stride_lh + offs_r[None, :],
        mask=row_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    q_pe = tl.load(
        q_pe_ptr + tok[:, None] * stride_pt + head[:, None] * stride_ph + offs_p[None, :],
        mask=row_ok[:, None] & (offs_p < ROPE)[None, :],
        other=0.0,
    )
    pos = context + q_local
    if KV_FP8:
        # As in unified_attention: fp16 dots (one conversion from fp8 on Hopper) on a query
        # pre-scaled so that a bf16 query cannot overflow fp16.
        q_lat = (q_lat.to(tl.float32) * qk_scale).to(tl.float16)
        q_pe = (q_pe.to(tl.float32) * qk_scale).to(tl.float16)
        qk_scale = 1.0

    # Keys of the whole q-block, in tiles; the first `full_hi` are seen by every row.
    first = context + q_block * BLOCK_Q
    last = context + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len) - 1
    kv_hi = tl.maximum(tl.minimum(last + 1, seq_len), 0)
    n_tiles = tl.cdiv(kv_hi, TILE)
    full_hi = tl.maximum(first + 1, 0) // TILE
    # This split's share of the tiles: an unmasked head, then a masked tail.
    per_split = tl.cdiv(n_tiles, num_splits)
    s_lo = tl.minimum(split * per_split, n_tiles)
    s_hi = tl.minimum(split * per_split + per_split, n_tiles)
    mid = tl.minimum(tl.maximum(full_hi, s_lo), s_hi)

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    acc = tl.zeros([BLOCK_M, RANK_P], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_latent_tiles(
        acc, m_i, l_i, q_lat, q_pe, s_lo, mid, cache_ptr, bt_row, pos, kv_hi, qk_scale,
        stride_kb, stride_ks, BLOCK_SIZE, TILE, RANK, RANK_P, ROPE, ROPE_P, False, DOT_PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _attend_latent_tiles(
        acc, m_i, l_i, q_lat, q_pe, mid, s_hi, cache_ptr, bt_row, pos, kv_hi, qk_scale,
        stride_kb, stride_ks, BLOCK_SIZE, TILE, RANK, RANK_P, ROPE, ROPE_P, True, DOT_PRECISION,
    )  # fmt: skip
    acc = acc * kv_scale  # the values are the same scaled rows as the keys

    store_rows(
        out_ptr, ws_acc_ptr, ws_m_ptr, ws_l_ptr, acc, m_i, l_i, tok, head, offs_r, row_ok, r_ok,
        split, num_splits, stride_ot, stride_oh, NUM_HEADS, RANK_P, SPLIT,
    )  # fmt: skip


@triton.jit(do_not_specialize=["num_seqs", "num_splits"])
def _mla_reduce_splits_kernel(
    out_ptr,  # [T, H, R]
    ws_acc_ptr,  # [T, H, num_splits, RANK_P]
    ws_m_ptr,  # [T, H, num_splits]
    ws_l_ptr,  # [T, H, num_splits]
    qsl_ptr,
    num_seqs,
    num_splits,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    RANK: tl.constexpr,
    RANK_P: tl.constexpr,
    SPLITS_P: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    if tok >= tl.load(qsl_ptr + num_seqs):  # padding tokens after the last sequence
        return
    row = (tok * NUM_HEADS + head) * num_splits
    offs_s = tl.arange(0, SPLITS_P)
    s_ok = offs_s < num_splits
    m = tl.load(ws_m_ptr + row + offs_s, mask=s_ok, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    m_exp = tl.where(m_max == float("-inf"), 0.0, m_max)
    lsum = tl.load(ws_l_ptr + row + offs_s, mask=s_ok, other=0.0)
    denom = tl.sum(tl.exp2(m - m_exp) * lsum, axis=0)
    # One split's [RANK_P] partial at a time: [splits, 512] fp32 at once would spill registers.
    offs_r = tl.arange(0, RANK_P)
    acc = tl.zeros([RANK_P], dtype=tl.float32)
    for s in range(num_splits):
        w = tl.exp2(tl.load(ws_m_ptr + row + s) - m_exp)
        acc += w * tl.load(ws_acc_ptr + (row + s) * RANK_P + offs_r)
    out = acc / tl.where(denom > 0.0, denom, 1.0)
    tl.store(
        out_ptr + tok * stride_ot + head * stride_oh + offs_r,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_r < RANK,
    )


def mla_latent_attention(
    q_lat: Tensor,  # [T, H, R]: q_nope W_UK (any token/head strides)
    q_pe: Tensor,  # [T, H, P]: the roped part of the query
    kv_cache: Tensor,  # [1, num_blocks, block_size, 1, R + P]
    block_tables: Tensor,  # [B, max_blocks] int32 (rows may be padded with 0)
    seq_lens: Tensor,  # [B] int32: context length incl. this step's tokens; 0 = padding row
    query_start_loc: Tensor,  # [B + 1] int32: sequence i owns query rows [qsl[i], qsl[i+1])
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    kv_scale: float = 1.0,
    out: Tensor | None = None,  # [T, H, R] written in place when given
    *,
    num_splits: int | None = None,  # KV splits; None = choose_num_splits (tests force it)
) -> Tensor:
    """Causal absorbed attention of every query row over its sequence's paged latents, returned
    in the latent space: softmax(scale * (q_lat . c_kv + q_pe . k_pe)) . c_kv.

    Query row r of sequence i sits at position seq_lens[i] - q_len + (r - qsl[i]). Rows of a
    sequence with seq_len 0 are written as zeros; rows after qsl[B] are left untouched.
    """
    _check_inputs(q_lat, q_pe, kv_cache, block_tables, seq_lens, query_start_loc, out)
    num_tokens, num_heads, rank = q_lat.shape
    rope = q_pe.shape[2]
    block_size = kv_cache.shape[2]
    num_seqs = block_tables.shape[0]
    if out is None:
        out = q_lat.new_empty(num_tokens, num_heads, rank)
    if num_tokens == 0 or num_seqs == 0:
        return out
    cfg = mla_launch_config(max_query_len, num_heads)
    if num_splits is None:
        num_splits = choose_num_splits(
            num_seqs, cfg.num_head_groups, max_query_len, max_seq_len, num_sms(q_lat.device),
            fill_twice=SPLITS_FILL_TWICE, short_splits=False,
        )  # fmt: skip
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    split = num_splits > 1
    rank_p, rope_p = (max(16, next_power_of_2(d)) for d in (rank, rope))
    kv_fp8 = kv_cache.dtype in FP8_DTYPES
    ws_acc, ws_m, ws_l = split_workspace(num_tokens, num_heads, num_splits, rank_p, q_lat)
    q_blocks = num_seqs if cfg.one_block_per_seq else num_tokens // cfg.block_q + num_seqs
    _mla_attention_kernel[(q_blocks, cfg.num_head_groups, num_splits)](
        out, q_lat, q_pe, kv_cache, block_tables, seq_lens, query_start_loc, ws_acc, ws_m, ws_l,
        scale * kv_scale, kv_scale, num_seqs, num_splits,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        out.stride(0), out.stride(1), kv_cache.stride(1), kv_cache.stride(2),
        block_tables.stride(0),
        NUM_HEADS=num_heads, HEAD_GROUP=cfg.head_group, RANK=rank, RANK_P=rank_p, ROPE=rope,
        ROPE_P=rope_p, BLOCK_SIZE=block_size, BLOCK_M=cfg.block_m, BLOCK_Q=cfg.block_q,
        TILE=TILE, ONE_BLOCK_PER_SEQ=cfg.one_block_per_seq, SPLIT=split, KV_FP8=kv_fp8,
        DOT_PRECISION="ieee" if q_lat.dtype == torch.float32 and not kv_fp8 else "tf32",
        num_warps=cfg.num_warps, num_stages=2,
    )  # fmt: skip
    if split:
        _mla_reduce_splits_kernel[(num_tokens, num_heads)](
            out, ws_acc, ws_m, ws_l, query_start_loc, num_seqs, num_splits,
            out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, RANK=rank, RANK_P=rank_p,
            SPLITS_P=next_power_of_2(num_splits), num_warps=4,
        )  # fmt: skip
    return out


def mla_paged_attention(
    q: Tensor,  # [T, H, nope + rope]
    kv_cache: Tensor,  # [1, num_blocks, block_size, 1, R + rope]
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    max_query_len: int,
    max_seq_len: int,
    w_kv_b: Tensor,  # kv_b_proj's weight [H * (nope + v), R]
    nope_dim: int,
    v_dim: int,
    scale: float,
    kv_scale: float = 1.0,
    out: Tensor | None = None,  # [T, H, v]
    *,
    num_splits: int | None = None,
) -> Tensor:
    """The layer's attention on CUDA: W_UK into the query, the latent kernel for every row, W_UV
    on its output; two batched GEMMs and one or two kernel launches, no host sync."""
    num_tokens, num_heads, _ = q.shape
    rank = w_kv_b.shape[1]
    w = w_kv_b.view(num_heads, nope_dim + v_dim, rank)
    w_uk, w_uv = w[:, :nope_dim], w[:, nope_dim:]  # [H, nope, R], [H, v, R]
    q_lat = torch.bmm(q[..., :nope_dim].transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, R]
    # The latent output laid out [H, T, R], so that the W_UV GEMM reads it contiguously.
    out_lat = q.new_empty(num_heads, num_tokens, rank).transpose(0, 1)
    mla_latent_attention(
        q_lat, q[..., nope_dim:], kv_cache, block_tables, seq_lens, query_start_loc,
        max_query_len, max_seq_len, scale, kv_scale, out_lat, num_splits=num_splits,
    )  # fmt: skip
    result = torch.bmm(out_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
    if out is None:
        return result
    out.copy_(result)
    return out


def _check_inputs(
    q_lat: Tensor,
    q_pe: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    out: Tensor | None,
) -> None:
    """Shapes and dtypes only: reading values would cost a host sync."""
    if q_lat.dim() != 3 or q_pe.shape[:2] != q_lat.shape[:2] or q_lat.dtype != q_pe.dtype:
        raise ValueError(
            f"want q_lat [T, H, R] and q_pe [T, H, P] of one dtype, got {tuple(q_lat.shape)} "
            f"{q_lat.dtype} and {tuple(q_pe.shape)} {q_pe.dtype}"
        )
    row = q_lat.shape[2] + q_pe.shape[2]
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 1 or kv_cache.shape[3:] != (1, row):
        raise ValueError(
            f"want kv_cache [1, blocks, block_size, 1, {row}], got {tuple(kv_cache.shape)}"
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
    strides = (q_lat.stride(2), q_pe.stride(2), kv_cache.stride(4), block_tables.stride(1))
    if strides != (1, 1, 1, 1):
        raise ValueError("q_lat, q_pe, kv_cache and block_tables need a contiguous last dimension")
    if out is not None and (out.shape != q_lat.shape or out.stride(2) != 1):
        raise ValueError(
            f"out must be {tuple(q_lat.shape)} with a contiguous last dimension, "
            f"got {tuple(out.shape)}"
        )
