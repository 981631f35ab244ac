"""Write the step's new K/V into their slots of the paged KV cache.

KV cache of one layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (0: keys, 1: values).

    slot s  ->  block s // block_size, offset s % block_size;  s < 0: skipped

Negative slots are the padding rows of CUDA-graph batches. An fp8 cache stores
clamp(x / scale, -max, max) (per-layer scales, read back as stored * scale): torch's cast of an
out-of-range value to float8_e4m3fn gives NaN, not the largest finite value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.grid import cdiv, next_power_of_2
from atom.kernels.launch import launch, pdl, pdl_start

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_BLOCK = 1024  # elements of one token's [num_kv_heads, head_dim] per program


def reshape_and_cache_ref(
    key: Tensor,
    value: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write key/value [T, num_kv_heads, head_dim] into kv_cache at slot_mapping [T] (in place)."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    if kv_cache.dtype in FP8_DTYPES:
        fp8_max = torch.finfo(kv_cache.dtype).max
        key = divide_by_scale(key.float(), k_scale).clamp(-fp8_max, fp8_max).to(kv_cache.dtype)
        value = divide_by_scale(value.float(), v_scale).clamp(-fp8_max, fp8_max).to(kv_cache.dtype)
    elif kv_cache.dtype != key.dtype:
        key, value = key.to(kv_cache.dtype), value.to(kv_cache.dtype)
    cache = _bytes(kv_cache)
    cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, _bytes(key))
    cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, _bytes(value))


def divide_by_scale(x: Tensor, scale: float) -> Tensor:
    """x / scale, IEEE-rounded as the kernels divide: CUDA torch computes a tensor over a Python
    scalar as x * (1 / scale), which rounds a few values one fp32 step apart (and then, rarely,
    one fp8 step apart). A 0-d tensor on x's device takes the true division."""
    return x / torch.tensor(scale, dtype=x.dtype, device=x.device)


def _bytes(t: Tensor) -> Tensor:
    """fp8 tensors as uint8: CPU indexing kernels are not built for float8."""
    return t.view(torch.uint8) if t.dtype in FP8_DTYPES else t


@triton.jit
def _store_scaled(src_ptr, dst_ptr, offs, mask, scale, fp8_max, IS_FP8: tl.constexpr):
    x = tl.load(src_ptr, mask=mask)
    if IS_FP8:
        # IEEE division (Triton's `/` is approximate in fp32): the same fp8 bits as the reference.
        x = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale), -fp8_max, fp8_max)
    tl.store(dst_ptr + offs, x.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,  # [2, num_slots, num_kv_heads * head_dim] contiguous
    slot_ptr,
    k_s_tok,
    k_s_head,
    v_s_tok,
    v_s_head,
    head_dim,
    row_size,  # num_kv_heads * head_dim
    value_offset,  # num_slots * row_size: where the values start
    k_scale,
    v_scale,
    fp8_max,
    IS_FP8: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_start(PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    # A negative slot masks every lane (as a bound, not `& (slot >= 0)`: the interpreter rejects
    # a mask broadcast from a scalar).
    mask = offs < tl.where(slot >= 0, row_size, 0)
    head, d = offs // head_dim, offs % head_dim
    dst = slot * row_size + offs
    k_src = key_ptr + token * k_s_tok + head * k_s_head + d
    v_src = value_ptr + token * v_s_tok + head * v_s_head + d
    _store_scaled(k_src, cache_ptr, dst, mask, k_scale, fp8_max, IS_FP8)
    _store_scaled(v_src, cache_ptr + value_offset, dst, mask, v_scale, fp8_max, IS_FP8)


def reshape_and_cache(
    key: Tensor,
    value: Tensor,
    kv_cache: Tensor,
    slot_mapping: Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write key/value [T, num_kv_heads, head_dim] (any token/head strides) into the contiguous
    kv_cache at slot_mapping [T] (in place); slots < 0 are skipped."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape or kv_cache.shape[-2:] != (num_kv_heads, head_dim):
        raise ValueError(f"key {key.shape}, value {value.shape} do not fit cache {kv_cache.shape}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    if num_tokens == 0:
        return
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    is_fp8 = kv_cache.dtype in FP8_DTYPES
    row_size = num_kv_heads * head_dim
    block = min(_BLOCK, next_power_of_2(row_size))
    grid = (num_tokens, cdiv(row_size, block))
    launch(
        _reshape_and_cache_kernel,
        grid,
        key,
        value,
        kv_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        head_dim,
        row_size,
        kv_cache[0].numel(),
        k_scale,
        v_scale,
        torch.finfo(kv_cache.dtype).max if is_fp8 else 0.0,
        IS_FP8=is_fp8,
        BLOCK=block,
        PDL=pdl(key),
        num_warps=4,
    )
