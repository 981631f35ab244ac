"""Rotary position embedding of q and k in one launch, from a [max_position, rotary_dim] cache.

Row p of the cache is [cos(p * f_0..f_{r/2-1}) | sin(...)], already scaled (llama3, yarn, ...) by
atom/layers/rotary.py. Two pairings of the first rotary_dim features of a head:

    neox  (halves):            x[i] with x[i + r/2]
    gpt-j (interleaved pairs): x[2i] with x[2i + 1]

Features past rotary_dim pass through unchanged (partial rotary). Out of place: q and k are often
views of the fused qkv output and the callers expect fresh, contiguous tensors.

qk_norm_rotary adds the per-head RMSNorm of q and k (Qwen3, GLM-4.5) before the rotation, in the
same launch: one kernel instead of three (two norms, then rotary), each a few microseconds of a
decode step's fixed cost per layer. Its values round where the separate kernels do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.grid import cdiv, next_power_of_2
from atom.kernels.rms_norm import rms_norm_ref

_TILE_ELEMENTS = 2048  # heads x head_dim elements per program


def rotary_embedding_ref(
    positions: Tensor,
    q: Tensor,
    k: Tensor,
    cos_sin_cache: Tensor,
    rotary_dim: int,
    is_neox_style: bool,
) -> tuple[Tensor, Tensor]:
    """positions [T]; q [T, H, D]; k [T, H_kv, D] -> (q_out, k_out), float32 inside."""
    cos, sin = cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
    return (
        _rotate_ref(q, cos, sin, rotary_dim, is_neox_style),
        _rotate_ref(k, cos, sin, rotary_dim, is_neox_style),
    )


def qk_norm_rotary_ref(
    positions: Tensor,
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    eps: float,
    cos_sin_cache: Tensor,
    rotary_dim: int,
    is_neox_style: bool,
) -> tuple[Tensor, Tensor]:
    """rotary_embedding_ref of rms_norm_ref(q), rms_norm_ref(k) (per head, over head_dim)."""
    q, k = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    return rotary_embedding_ref(positions, q, k, cos_sin_cache, rotary_dim, is_neox_style)


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
def _rotate_heads(
    x_ptr,
    out_ptr,  # [T, num_heads, head_dim] contiguous
    w_ptr,  # the per-head RMSNorm weight [head_dim] (read only when HAS_NORM)
    s_tok,
    s_head,
    token,
    head0,
    num_heads,
    cos,  # [BLOCK_R] float32
    sin,
    head_dim,
    rotary_dim,
    eps,
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
    dst = out_ptr + (token * num_heads + heads[:, None]) * head_dim
    out_ty = out_ptr.dtype.element_ty
    x1 = tl.load(src + d1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + d2[None, :], mask=mask, other=0.0).to(tl.float32)
    d = tl.arange(0, BLOCK_D)
    tail = (heads < num_heads)[:, None] & ((d >= rotary_dim) & (d < head_dim))[None, :]
    if HAS_NORM:
        row = (heads < num_heads)[:, None] & (d < head_dim)[None, :]
        xf = tl.load(src + d[None, :], mask=row, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / head_dim + eps)[:, None]
        x1 = _normed(x1, rstd, w_ptr, d1[None, :], mask, out_ty)
        x2 = _normed(x2, rstd, w_ptr, d2[None, :], mask, out_ty)
        if HAS_TAIL:
            tl.store(
                dst + d[None, :], _normed(xf, rstd, w_ptr, d[None, :], tail, out_ty), mask=tail
            )
    elif HAS_TAIL:
        tl.store(dst + d[None, :], tl.load(src + d[None, :], mask=tail), mask=tail)
    tl.store(dst + d1[None, :], (x1 * cos[None, :] - x2 * sin[None, :]).to(out_ty), mask=mask)
    tl.store(dst + d2[None, :], (x2 * cos[None, :] + x1 * sin[None, :]).to(out_ty), mask=mask)


@triton.jit
def _rotary_embedding_kernel(
    pos_ptr,
    cache_ptr,  # [max_position, rotary_dim] float32 contiguous
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    q_w_ptr,
    k_w_ptr,
    q_s_tok,
    q_s_head,
    k_s_tok,
    k_s_head,
    num_q_heads,
    num_kv_heads,
    head_dim,
    rotary_dim,
    eps,
    IS_NEOX: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid (T, q head blocks + k head blocks): decode batches still spread over many programs.
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
    half = rotary_dim // 2
    i = tl.arange(0, BLOCK_R)
    row = cache_ptr + tl.load(pos_ptr + token).to(tl.int64) * rotary_dim
    cos = tl.load(row + i, mask=i < half, other=0.0)
    sin = tl.load(row + half + i, mask=i < half, other=0.0)
    if head_block < q_blocks:
        _rotate_heads(
            q_ptr,
            q_out_ptr,
            q_w_ptr,
            q_s_tok,
            q_s_head,
            token,
            head_block * BLOCK_H,
            num_q_heads,
            cos,
            sin,
            head_dim,
            rotary_dim,
            eps,
            IS_NEOX,
            HAS_TAIL,
            HAS_NORM,
            BLOCK_H,
            BLOCK_R,
            BLOCK_D,
        )
    else:
        _rotate_heads(
            k_ptr,
            k_out_ptr,
            k_w_ptr,
            k_s_tok,
            k_s_head,
            token,
            (head_block - q_blocks) * BLOCK_H,
            num_kv_heads,
            cos,
            sin,
            head_dim,
            rotary_dim,
            eps,
            IS_NEOX,
            HAS_TAIL,
            HAS_NORM,
            BLOCK_H,
            BLOCK_R,
            BLOCK_D,
        )


def rotary_embedding(
    positions: Tensor,
    q: Tensor,
    k: Tensor,
    cos_sin_cache: Tensor,
    rotary_dim: int,
    is_neox_style: bool,
) -> tuple[Tensor, Tensor]:
    """positions [T] int; q [T, H, D]; k [T, H_kv, D] (any token/head strides) -> new contiguous
    (q_out, k_out); the inputs are not written."""
    return _launch(positions, q, k, None, cos_sin_cache, rotary_dim, is_neox_style)


def qk_norm_rotary(
    positions: Tensor,
    q: Tensor,
    k: Tensor,
    q_weight: Tensor,
    k_weight: Tensor,
    eps: float,
    cos_sin_cache: Tensor,
    rotary_dim: int,
    is_neox_style: bool,
) -> tuple[Tensor, Tensor]:
    """rotary_embedding of the per-head RMSNorm of q and k (weights [D]), in one launch."""
    head_dim = q.shape[-1]
    if q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,):
        raise ValueError(
            f"norm weights {q_weight.shape} / {k_weight.shape} for head_dim {head_dim}"
        )
    if q_weight.dtype != q.dtype or k_weight.dtype != k.dtype:
        raise ValueError(f"norm weights {q_weight.dtype} for q/k {q.dtype}: one dtype")
    norm = (q_weight, k_weight, eps)
    return _launch(positions, q, k, norm, cos_sin_cache, rotary_dim, is_neox_style)


def _launch(
    positions: Tensor,
    q: Tensor,
    k: Tensor,
    norm: tuple[Tensor, Tensor, float] | None,
    cos_sin_cache: Tensor,
    rotary_dim: int,
    is_neox_style: bool,
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
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    num_tokens, num_q_heads, num_kv_heads = q.shape[0], q.shape[1], k.shape[1]
    if num_tokens == 0:
        return q_out, k_out
    q_weight, k_weight, eps = norm if norm is not None else (q, k, 0.0)  # unread without norm
    block_d = next_power_of_2(head_dim)
    block_h = min(max(_TILE_ELEMENTS // block_d, 1), next_power_of_2(max(num_q_heads, 1)))
    grid = (num_tokens, cdiv(num_q_heads, block_h) + cdiv(num_kv_heads, block_h))
    _rotary_embedding_kernel[grid](
        positions,
        cos_sin_cache.contiguous().float(),
        q,
        k,
        q_out,
        k_out,
        q_weight,
        k_weight,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        num_q_heads,
        num_kv_heads,
        head_dim,
        rotary_dim,
        eps,
        IS_NEOX=is_neox_style,
        HAS_TAIL=rotary_dim < head_dim,
        HAS_NORM=norm is not None,
        BLOCK_H=block_h,
        BLOCK_R=next_power_of_2(rotary_dim // 2),
        BLOCK_D=block_d,
        num_warps=4,
    )
    return q_out, k_out
