"""The attention layer's qkv projection of a decode step with rotary and the KV-cache write in
its epilogue: gemv (1-MAX_M rows) whose output tile is one head, so that the program that ends a
tile (the last of its K splits) rotates it and stores it where the next kernels read it: q into a
[T, H, D] buffer, k (rotated) and v straight into the paged KV cache, as rotary_and_cache writes
them (fp8 scaled, slots < 0 skipped, Qwen3's per-head q/k RMSNorm first). One launch and one
[T, (H + 2 H_kv) D] round trip fewer a layer than gemv, then rotary_and_cache.

Neox pairing over the whole head only (rotary_dim == head_dim: Llama, Qwen3, Mistral): a tile's
rows are a head's features in order, its two halves the pairs. Values round where the two
kernels round them: the GEMM's sums to the model dtype, then the rotation in float32.

The tile: the weight's gemv tile (`linear_config`) with its rows made one head (`rope_tile`): a
64 x 128 tile split 2 becomes 128 x 128 split 2 for Llama-3.1-8B's 128-dim heads.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels import gemv as _gemv
from atom.kernels.gemv import (
    _SCALE_PARTS,
    GemvConfig,
    RowScale,
    _add_splits,
    _row_rstd,
    _tile_offsets,
    _tile_sums,
    gemv_ref,
    row_rstd_ref,
)
from atom.kernels.launch import launch, pdl, pdl_start
from atom.kernels.reshape_and_cache import FP8_DTYPES
from atom.kernels.rotary import Norm, _normed, _put, rotary_and_cache_ref

# 0: gemv, then rotary_and_cache (two launches); BLOCK_K:SPLIT_K:STAGES: the fused launch with
# that tile (a measuring aid); otherwise rope_tile's.
ROPE_ENV = "ATOM_GEMV_ROPE"
ROPE = os.environ.get(ROPE_ENV, "1")


SHARED_BUDGET = 200 * 1024  # bytes of a program's pipeline stages (an H100/H200 block: 227 KB)


def rope_tile(cfg: GemvConfig, head_dim: int, itemsize: int = 2) -> GemvConfig:
    """gemv's tile made one head of rows, its K tile, split and stages kept where the stages'
    weight and x tiles (itemsize bytes an element) fit SHARED_BUDGET, else the K tile halved
    until they do. H200, the 8B's batch-1 step: its 64 x 128 tile split 2 so made 128 x 128
    took 4.339 ms against 4.362 for gemv, then rotary; keeping a K step's bytes (128 x 64, split
    4) 4.348, and 4.67 against 4.62 at 16 rows (RESULTS, thirty-fourth sitting).
    ATOM_GEMV_ROPE=BLOCK_K:SPLIT_K:STAGES sets them instead (a measuring aid)."""
    if ROPE.count(":") == 2:
        block_k, split_k, stages = map(int, ROPE.split(":"))
        return dataclasses.replace(
            cfg, block_n=head_dim, block_k=block_k, split_k=split_k, num_stages=stages
        )
    block_k = cfg.block_k
    per_k = (head_dim + _gemv.MAX_M) * itemsize  # a stage's weight and x bytes per K element
    while block_k > 16 and cfg.num_stages * per_k * block_k > SHARED_BUDGET:
        block_k //= 2
    return dataclasses.replace(cfg, block_n=head_dim, block_k=block_k)


def fuses(rows: int, weight: Tensor, head_dim: int, rotary_dim: int, is_neox: bool) -> bool:
    """Whether gemv_rope_and_cache takes this projection: on (ATOM_GEMV_ROPE), rows gemv streams
    in one row tile with its weight tiles through descriptors (16-byte aligned rows), neox over
    whole heads of a power of two that a descriptor's box holds."""
    if ROPE == "0" or not 0 < rows <= _gemv.MAX_M or not is_neox or rotary_dim != head_dim:
        return False
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= _gemv.MAX_DESC_BOX:
        return False
    cfg = _gemv.linear_config(rows, weight)
    if cfg is None or not cfg.descriptor or cfg.block_m not in (0, _gemv.MAX_M):
        return False
    return _gemv.tile_descriptor(weight, head_dim, 16) is not None


@triton.jit
def _rope_store(
    acc, offs_m, m_ok, head, cos, sin, slot, q_ptr, cache_ptr, qn_ptr, kn_ptr, num_heads,
    num_kv_heads, value_offset, eps, k_scale, v_scale, fp8_max,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_NORM: tl.constexpr, IS_FP8: tl.constexpr,
):  # fmt: skip
    """One head of sums [BLOCK_M, HEAD_DIM] to its place: q rotated into q_ptr [T, H, D]; k
    rotated and v into the cache at each token's slot (cos, sin [BLOCK_M, HEAD_DIM / 2] and the
    slots [BLOCK_M] loaded before the K loop: nothing waits on them here)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    ty = q_ptr.dtype.element_ty
    y = acc.to(ty).to(tl.float32)  # the GEMM's output, rounded
    x1, x2 = tl.split(tl.permute(tl.reshape(y, [BLOCK_M, 2, HALF]), [0, 2, 1]))
    i = tl.arange(0, HALF)
    d1 = i[None, :]
    d2 = d1 + HALF
    if head < num_heads + num_kv_heads:  # q or k: normed (HAS_NORM), then rotated
        if HAS_NORM:
            w_ptr = qn_ptr if head < num_heads else kn_ptr
            rstd = tl.rsqrt(tl.sum(y * y, axis=1) / HEAD_DIM + eps)[:, None]
            x1 = _normed(x1, rstd, w_ptr, d1, m_ok[:, None], ty)
            x2 = _normed(x2, rstd, w_ptr, d2, m_ok[:, None], ty)
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if head < num_heads:
        q_dst = q_ptr + offs_m[:, None].to(tl.int64) * num_heads * HEAD_DIM + head * HEAD_DIM
        _put(q_dst + d1, x1, m_ok[:, None], ty, 1.0, 0.0, False)
        _put(q_dst + d2, x2, m_ok[:, None], ty, 1.0, 0.0, False)
    else:
        ok = (m_ok & (slot >= 0))[:, None]
        kv_head = head - num_heads
        scale = k_scale
        if kv_head >= num_kv_heads:  # v: the cache's second half
            kv_head -= num_kv_heads
            scale = v_scale
            cache_ptr += value_offset
        kv_dst = cache_ptr + (slot[:, None] * num_kv_heads + kv_head) * HEAD_DIM
        _put(kv_dst + d1, x1, ok, ty, scale, fp8_max, IS_FP8)
        _put(kv_dst + d2, x2, ok, ty, scale, fp8_max, IS_FP8)


@triton.jit(do_not_specialize=["M", "parts"])
def _gemv_rope_kernel(
    x,  # [M, K], last dim contiguous
    w,  # a descriptor of the [(H + 2 H_kv) D, K] weight's [HEAD_DIM, BLOCK_K] tiles
    q_ptr,  # [M, H, D] out
    cache_ptr,  # [2, slots, H_kv, D] contiguous (values from value_offset)
    ws_ptr,  # SPLIT_K > 1: [SPLIT_K, M, N] float32 partial sums
    count_ptr,  # SPLIT_K > 1: int32 per output tile, 0 between launches
    pos_ptr,  # [M] positions
    slot_ptr,  # [M] cache slots, < 0: not written
    cos_sin_ptr,  # [max_position, D] float32: cos | sin
    qn_ptr,  # HAS_NORM: the per-head RMSNorm weights of q and k [D]
    kn_ptr,
    ss_ptr,  # ROW_SCALE: [M, parts] float32 partial sums of squares of x's rows before a norm
    M,
    N,
    K,
    stride_xm,
    parts,
    row_eps,
    num_heads,
    num_kv_heads,
    value_offset,
    eps,
    k_scale,
    v_scale,
    fp8_max,
    HEAD_DIM: tl.constexpr,  # the tile's rows: one head
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    IS_FP8: tl.constexpr,
    ROW_SCALE: tl.constexpr,  # x is a deferred RMSNorm's rows: the sums times their 1/rms
):
    pdl_start(PDL)
    # The epilogue's inputs (step inputs, written before any kernel of the step) asked for
    # before the K loop, their values used after it: no program waits on them before streaming.
    # The cos / sin rows hang on the positions: asked for after the loop, in flight while the
    # splits meet.
    offs_m, offs_n = _tile_offsets(BLOCK_M, HEAD_DIM)
    m_ok = offs_m < M
    pos = tl.load(pos_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    slot = tl.load(slot_ptr + offs_m, mask=m_ok, other=-1).to(tl.int64)
    if ROW_SCALE:
        rstd = _row_rstd(ss_ptr, offs_m, M, parts, K, row_eps, _SCALE_PARTS)
    acc, up = _tile_sums(
        x, w, offs_m, offs_n, M, N, K, stride_xm, 0, BLOCK_M, HEAD_DIM, BLOCK_K, SPLIT_K, True,
        False, DOT_PRECISION, False,
    )  # fmt: skip
    row = cos_sin_ptr + pos[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM // 2)[None, :]
    cos = tl.load(row, mask=m_ok[:, None], other=0.0)
    sin = tl.load(row + HEAD_DIM // 2, mask=m_ok[:, None], other=0.0)
    acc, up, last = _add_splits(
        acc, up, offs_m, offs_n, ws_ptr, count_ptr, M, N, BLOCK_M, HEAD_DIM, SPLIT_K, False
    )
    if last:
        if ROW_SCALE:
            acc = acc * rstd[:, None]
        _rope_store(
            acc, offs_m, m_ok, tl.program_id(1), cos, sin, slot, q_ptr, cache_ptr, qn_ptr, kn_ptr,
            num_heads, num_kv_heads, value_offset, eps, k_scale, v_scale, fp8_max, HEAD_DIM,
            BLOCK_M, HAS_NORM, IS_FP8,
        )  # fmt: skip


def gemv_rope_and_cache(
    x: Tensor,
    weight: Tensor,
    positions: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    cos_sin_cache: Tensor,
    num_heads: int,
    num_kv_heads: int,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    norm: Norm | None = None,
    config: GemvConfig | None = None,
    row_scale: RowScale | None = None,
) -> Tensor:
    """x [T, K] (T <= gemv.MAX_M) @ weight [(H + 2 H_kv) D, K]^T split into q, k, v heads; q and k
    rotated (neox, the whole head; after the per-head norms when `norm` is given), k and v
    written into kv_cache [2, blocks, block_size, H_kv, D] at slot_mapping [T] (< 0 skipped; fp8
    stores value / scale). Returns q [T, H, D]. config: gemv's tile of this weight (default
    linear_config's), made one head of rows (rope_tile). row_scale: x holds a deferred
    RMSNorm's rows, each row's sums multiplied by its 1/rms first (gemv.gemv's)."""
    head_dim = kv_cache.shape[-1]
    t, k = x.shape
    if weight.shape != ((num_heads + 2 * num_kv_heads) * head_dim, k) or x.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)}, weight {tuple(weight.shape)}: no qkv of those heads")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[-2] != num_kv_heads:
        raise ValueError(
            f"cache {tuple(kv_cache.shape)} is not [2, blocks, size, {num_kv_heads}, D]"
        )
    if not kv_cache.is_contiguous() or cos_sin_cache.shape[-1] != head_dim:
        raise ValueError("want a contiguous cache and a cos|sin cache over the whole head")
    if not 0 < t <= _gemv.MAX_M or positions.shape != (t,) or slot_mapping.shape != (t,):
        raise ValueError(f"{t} rows (at most {_gemv.MAX_M}), positions and slots of each")
    if x.dtype != weight.dtype or weight.stride(-1) != 1:
        raise ValueError("x and weight of one dtype, the weight's rows contiguous")
    x = x if x.stride(-1) == 1 else x.contiguous()
    cfg = rope_tile(config or _gemv.linear_config(t, weight) or _gemv.gemv_config(*weight.shape),
                    head_dim, weight.element_size())  # fmt: skip
    block_m, _, block_k, split_k = _gemv.tile_sizes(cfg, t, weight.shape[0], k)
    w_desc = _gemv.tile_descriptor(weight, head_dim, block_k)
    if w_desc is None:
        raise ValueError("the weight's tiles do not fit a tensor descriptor")
    q = torch.empty((t, num_heads, head_dim), dtype=x.dtype, device=x.device)
    n = weight.shape[0]
    grid = (1, n // head_dim, split_k)
    ws, counters = _gemv.split_buffers(split_k, t, n, grid[1], q)
    q_norm, k_norm, eps = norm if norm is not None else (q, q, 0.0)  # unread without norm
    is_fp8 = kv_cache.dtype in FP8_DTYPES
    sumsq, row_eps = row_scale if row_scale is not None else (ws, 0.0)  # unread without
    launch(
        _gemv_rope_kernel, grid,
        x, w_desc, q, kv_cache, ws, counters, positions, slot_mapping,
        cos_sin_cache.contiguous().float(), q_norm, k_norm, sumsq, t, n, k, x.stride(0),
        sumsq.shape[-1], row_eps, num_heads, num_kv_heads, kv_cache[0].numel(), eps, k_scale,
        v_scale,
        torch.finfo(kv_cache.dtype).max if is_fp8 else 0.0,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_K=block_k, SPLIT_K=split_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PDL=pdl(x),
        HAS_NORM=norm is not None, IS_FP8=is_fp8, ROW_SCALE=row_scale is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return q


def gemv_rope_and_cache_ref(
    x: Tensor,
    weight: Tensor,
    positions: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    cos_sin_cache: Tensor,
    num_heads: int,
    num_kv_heads: int,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    norm: Norm | None = None,
    row_scale: RowScale | None = None,
) -> Tensor:
    """The chain of references: the projection (float32, times the rows' 1/rms with a
    row_scale, rounded to x's dtype), then rotary_and_cache_ref."""
    head_dim = kv_cache.shape[-1]
    y = gemv_ref(x, weight)
    if row_scale is not None:
        y = y * row_rstd_ref(row_scale, x.shape[-1])
    q, k, v = y.to(x.dtype).view(x.shape[0], -1, head_dim).split(
        [num_heads, num_kv_heads, num_kv_heads], dim=1
    )  # fmt: skip
    args = (cos_sin_cache, head_dim, True, k_scale, v_scale, norm)
    return rotary_and_cache_ref(positions, q, k, v, kv_cache, slot_mapping, *args)
