"""Rotary position embedding of q and k in one launch, from a [max_position, rotary_dim] cache.

Row p of the cache is [cos(p * f_0..f_{r/2-1}) | sin(...)], already scaled (llama3, yarn, ...) by
atom/layers/rotary.py. Two pairings of the first rotary_dim features of a head:

    neox  (halves):            x[i] with x[i + r/2]
    gpt-j (interleaved pairs): x[2i] with x[2i + 1]

Features past rotary_dim pass through unchanged (partial rotary). Out of place: q and k are often
views of the fused qkv output and the callers expect fresh, contiguous tensors.

With `norm` the per-head RMSNorm of q and k (Qwen3, GLM-4.5) runs before the rotation, in the
same launch: one kernel instead of three (two norms, then rotary), each a few microseconds of a
decode step's fixed cost per layer. Its values round where the separate kernels do.

rotary_and_cache writes the rotated k, and v, straight into the paged KV cache (what
reshape_and_cache would write, fp8 included) and returns only q: the attention layer's op calls it
in place of rotary + reshape_and_cache, one launch (and one k round trip) fewer per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.grid import cdiv, next_power_of_2
from atom.kernels.launch import launch, pdl, pdl_start
from atom.kernels.reshape_and_cache import FP8_DTYPES, reshape_and_cache_ref
from atom.kernels.rms_norm import rms_norm_ref

_TILE_ELEMENTS = 2048  # heads x head_dim elements per program

Norm = tuple[Tensor, Tensor, float]  # the per-head RMSNorm weights of q and k [D], and eps


def rotary_embedding_ref(
    positions: Tensor,
    q: Tensor,
    k: Tensor,
    cos_sin_cache: Tensor,
    rotary_dim: int,
    is_neox_style: bool,
    norm: Norm | None = None,
) -> tuple[Tensor, Tensor]:
    """positions [T]; q [T, H, D]; k [T, H_kv, D] -> (q_out, k_out), float32 inside; with
    `norm`, of rms_norm_ref(q), rms_norm_ref(k) (per head, over head_dim)."""
    if norm is not None:
        q_weight, k_weight, eps = norm
        q, k = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    cos, sin = cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
    return (
        _rotate_ref(q, cos, sin, rotary_dim, is_neox_style),
        _rotate_ref(k, cos, sin, rotary_dim, is_neox_style),
    )


def _rotate_ref(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, is_neox: bool) -> Tensor:
    rot = x[..., :rotary_dim].float()
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., ::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    out = out.to(x.dtype)
    if rotary_dim < x.shape[-1]:
        out = torch.cat([out, x[..., rotary_dim:]], dim=-1)
    return out


@triton.jit
def _normed(x, rstd, w_ptr, d, mask, dtype):
    """RMSNorm's output as its own kernel writes it: (x * rstd) rounded, times the weight,
    rounded again; float32 for the rotation that follows."""
    w = tl.load(w_ptr + d, mask=mask, other=0.0).to(tl.float32)
    return ((x * rstd).to(dtype).to(tl.float32) * w).to(dtype).to(tl.float32)


@triton.jit
def _put(ptr, x, mask, round_ty, scale, fp8_max, IS_FP8: tl.constexpr):
    """Store x rounded to the model dtype; an fp8 cache gets clamp(rounded / scale) as
    reshape_and_cache writes it (IEEE division: the same bits as the reference)."""
    x = x.to(round_ty)
    if IS_FP8:
        x = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -fp8_max, fp8_max)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(
    x_ptr,
    dst_ptr,  # this token's first output element: heads at head_dim strides from here
    w_ptr,  # the per-head RMSNorm weight [head_dim] (read only when HAS_NORM)
    s_tok,
    s_head,
    token,
    head0,
    num_heads,  # heads past this bound are neither read nor written (0: a skipped cache slot)
    cos,  # [BLOCK_R] float32
    sin,
    head_dim,
    rotary_dim,
    eps,
    scale,  # fp8 destinations store value / scale
    fp8_max,
    IS_FP8: tl.constexpr,
    IS_NEOX: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    heads = head0 + tl.arange(0, BLOCK_H)
    half = rotary_dim // 2
    i = tl.arange(0, BLOCK_R)
    if IS_NEOX:
        d1, d2 = i, i + half
    else:
        d1, d2 = 2 * i, 2 * i + 1
    mask = (heads < num_heads)[:, None] & (i < half)[None, :]
    src = x_ptr + token * s_tok + heads[:, None] * s_head
    dst = dst_ptr + heads[:, None] * head_dim
    ty = x_ptr.dtype.element_ty  # values round where the separate kernels round them
    x1 = tl.load(src + d1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + d2[None, :], mask=mask, other=0.0).to(tl.float32)
    d = tl.arange(0, BLOCK_D)
    tail = (heads < num_heads)[:, None] & ((d >= rotary_dim) & (d < head_dim))[None, :]
    if HAS_NORM:
        row = (heads < num_heads)[:, None] & (d < head_dim)[None, :]
        xf = tl.load(src + d[None, :], mask=row, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / head_dim + eps)[:, None]
        x1 = _normed(x1, rstd, w_ptr, d1[None, :], mask, ty)
        x2 = _normed(x2, rstd, w_ptr, d2[None, :], mask, ty)
        if HAS_TAIL:
            t = _normed(xf, rstd, w_ptr, d[None, :], tail, ty)
            _put(dst + d[None, :], t, tail, ty, scale, fp8_max, IS_FP8)
    elif HAS_TAIL:
        t = tl.load(src + d[None, :], mask=tail)
        _put(dst + d[None, :], t, tail, ty, scale, fp8_max, IS_FP8)
    y1 = x1 * cos[None, :] - x2 * sin[None, :]
    y2 = x2 * cos[None, :] + x1 * sin[None, :]
    _put(dst + d1[None, :], y1, mask, ty, scale, fp8_max, IS_FP8)
    _put(dst + d2[None, :], y2, mask, ty, scale, fp8_max, IS_FP8)


@triton.jit
def _copy_heads(
    x_ptr, dst_ptr, s_tok, s_head, token, head0, num_heads, head_dim, scale, fp8_max,
    IS_FP8: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """V into the cache beside its K: heads [head0, head0 + BLOCK_H) of one token."""
    heads = head0 + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (heads < num_heads)[:, None] & (d < head_dim)[None, :]
    x = tl.load(x_ptr + token * s_tok + heads[:, None] * s_head + d[None, :], mask=mask)
    dst = dst_ptr + heads[:, None] * head_dim + d[None, :]
    _put(dst, x, mask, x_ptr.dtype.element_ty, scale, fp8_max, IS_FP8)


@triton.jit
def _rotary_embedding_kernel(
    pos_ptr,
    cos_sin_ptr,  # [max_position, rotary_dim] float32 contiguous
    q_ptr,
    k_ptr,
    v_ptr,  # read only when HAS_CACHE
    q_out_ptr,  # [T, num_q_heads, head_dim]
    k_out_ptr,  # [T, num_kv_heads, head_dim], or the KV cache [2, slots, kv heads, head_dim]
    slot_ptr,  # [T] cache slot of each token, < 0: not written (HAS_CACHE only)
    q_w_ptr,
    k_w_ptr,
    q_s_tok,
    q_s_head,
    k_s_tok,
    k_s_head,
    v_s_tok,
    v_s_head,
    num_q_heads,
    num_kv_heads,
    head_dim,
    rotary_dim,
    eps,
    value_offset,  # where the cache's values start (HAS_CACHE only)
    k_scale,
    v_scale,
    fp8_max,
    IS_NEOX: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_CACHE: tl.constexpr,
    IS_FP8: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    # grid (T, q head blocks + k head blocks): decode batches still spread over many programs.
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    half = rotary_dim // 2
    i = tl.arange(0, BLOCK_R)
    row = cos_sin_ptr + tl.load(pos_ptr + token).to(tl.int64) * rotary_dim
    cos = tl.load(row + i, mask=i < half, other=0.0)
    sin = tl.load(row + half + i, mask=i < half, other=0.0)
    if head_block < q_blocks:
        _rotate_heads(
            q_ptr, q_out_ptr + token * num_q_heads * head_dim, q_w_ptr, q_s_tok, q_s_head,
            token, head_block * BLOCK_H, num_q_heads, cos, sin, head_dim, rotary_dim, eps,
            1.0, 0.0, False, IS_NEOX, HAS_TAIL, HAS_NORM, BLOCK_H, BLOCK_R, BLOCK_D,
        )  # fmt: skip
    else:
        head0 = (head_block - q_blocks) * BLOCK_H
        if HAS_CACHE:
            slot = tl.load(slot_ptr + token).to(tl.int64)
            # A negative slot writes nothing: a head bound of 0 masks every lane (a scalar
            # condition in the mask itself is what the interpreter rejects).
            bound = tl.where(slot >= 0, num_kv_heads, 0)
            k_dst = k_out_ptr + slot * num_kv_heads * head_dim
            _copy_heads(
                v_ptr, k_dst + value_offset, v_s_tok, v_s_head, token, head0, bound, head_dim,
                v_scale, fp8_max, IS_FP8, BLOCK_H, BLOCK_D,
            )  # fmt: skip
        else:
            bound = num_kv_heads
            k_dst = k_out_ptr + token * num_kv_heads * head_dim
        _rotate_heads(
            k_ptr, k_dst, k_w_ptr, k_s_tok, k_s_head, token, head0, bound, cos, sin, head_dim,
            rotary_dim, eps, k_scale, fp8_max, IS_FP8, IS_NEOX, HAS_TAIL, HAS_NORM, BLOCK_H,
            BLOCK_R, BLOCK_D,
        )  # fmt: skip


def rotary_embedding(
    positions: Tensor,
    q: Tensor,
    k: Tensor,
    cos_sin_cache: Tensor,
    rotary_dim: int,
    is_neox_style: bool,
    norm: Norm | None = None,
) -> tuple[Tensor, Tensor]:
    """positions [T] int; q [T, H, D]; k [T, H_kv, D] (any token/head strides) -> new contiguous
    (q_out, k_out); the inputs are not written. With `norm`, q and k are normed per head first,
    in the same launch."""
    return _launch(positions, q, k, norm, cos_sin_cache, rotary_dim, is_neox_style)


def rotary_and_cache(
    positions: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    cos_sin_cache: Tensor,
    rotary_dim: int,
    is_neox_style: bool,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    norm: Norm | None = None,
) -> Tensor:
    """rotary_embedding (after the q/k norms when `norm` is given), with the rotated k and v
    written straight into the paged kv_cache [2, blocks, block_size, H_kv, D] at slot_mapping
    [T] as reshape_and_cache writes them (slots < 0 skipped; fp8 scaled): one launch where there
    were two. Returns the rotated q; the inputs are not written."""
    if v.shape != k.shape or kv_cache.shape[-2:] != k.shape[1:] or kv_cache.shape[0] != 2:
        raise ValueError(f"k {k.shape}, v {v.shape} do not fit cache {kv_cache.shape}")
    if not kv_cache.is_contiguous() or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"want a contiguous cache and slots [{k.shape[0]}]")
    cache = (v if v.stride(-1) == 1 else v.contiguous(), kv_cache, slot_mapping, k_scale, v_scale)
    q_out, _ = _launch(positions, q, k, norm, cos_sin_cache, rotary_dim, is_neox_style, cache)
    return q_out


def rotary_and_cache_ref(
    positions: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    cos_sin_cache: Tensor,
    rotary_dim: int,
    is_neox_style: bool,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    norm: Norm | None = None,
) -> Tensor:
    """The chain of references: rotary_embedding_ref, then reshape_and_cache_ref."""
    args = (cos_sin_cache, rotary_dim, is_neox_style, norm)
    q, k = rotary_embedding_ref(positions, q, k, *args)
    reshape_and_cache_ref(k, v, kv_cache, slot_mapping, k_scale, v_scale)
    return q


def _launch(
    positions: Tensor,
    q: Tensor,
    k: Tensor,
    norm: Norm | None,
    cos_sin_cache: Tensor,
    rotary_dim: int,
    is_neox_style: bool,
    cache: tuple[Tensor, Tensor, Tensor, float, float] | None = None,  # v, kv_cache, slots, scales
) -> tuple[Tensor, Tensor]:
    head_dim = q.shape[-1]
    if q.dim() != 3 or k.dim() != 3 or k.shape[-1] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, heads, head_dim]")
    if not q.shape[0] == k.shape[0] == positions.shape[0]:
        raise ValueError(
            f"shapes do not fit: q {q.shape}, k {k.shape}, positions {positions.shape}"
        )
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim or cos_sin_cache.shape[-1] != rotary_dim:
        raise ValueError(f"rotary_dim {rotary_dim} does not fit head_dim {head_dim} / cache")
    if norm is not None:
        _check_norm(norm, q, k)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_tokens, num_q_heads, num_kv_heads = q.shape[0], q.shape[1], k.shape[1]
    if cache is None:
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        v, slots, value_offset, k_scale, v_scale, is_fp8 = k, positions, 0, 1.0, 1.0, False
    else:
        v, k_out, slots, k_scale, v_scale = cache
        value_offset = k_out[0].numel()
        is_fp8 = k_out.dtype in FP8_DTYPES
    if num_tokens == 0:
        return q_out, k_out
    q_weight, k_weight, eps = norm if norm is not None else (q, k, 0.0)  # unread without norm
    block_d = next_power_of_2(head_dim)
    block_h = min(max(_TILE_ELEMENTS // block_d, 1), next_power_of_2(max(num_q_heads, 1)))
    grid = (num_tokens, cdiv(num_q_heads, block_h) + cdiv(num_kv_heads, block_h))
    launch(
        _rotary_embedding_kernel, grid,
        positions, cos_sin_cache.contiguous().float(), q, k, v, q_out, k_out, slots,
        q_weight, k_weight, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), num_q_heads, num_kv_heads, head_dim, rotary_dim, eps,
        value_offset, k_scale, v_scale, torch.finfo(k_out.dtype).max if is_fp8 else 0.0,
        IS_NEOX=is_neox_style, HAS_TAIL=rotary_dim < head_dim, HAS_NORM=norm is not None,
        HAS_CACHE=cache is not None, IS_FP8=is_fp8, BLOCK_H=block_h,
        BLOCK_R=next_power_of_2(rotary_dim // 2), BLOCK_D=block_d, PDL=pdl(q), num_warps=4,
    )  # fmt: skip
    return q_out, k_out


def _check_norm(norm: Norm, q: Tensor, k: Tensor) -> None:
    q_weight, k_weight, _ = norm
    head_dim = q.shape[-1]
    if q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,):
        raise ValueError(
            f"norm weights {q_weight.shape} / {k_weight.shape} for head_dim {head_dim}"
        )
    if q_weight.dtype != q.dtype or k_weight.dtype != k.dtype:
        raise ValueError(f"norm weights {q_weight.dtype} for q/k {q.dtype}: one dtype")
