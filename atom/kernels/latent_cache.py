"""Write the step's MLA latents (c_kv | k_pe, one row per token) into the paged latent cache.

    kv_cache [1, num_blocks, block_size, 1, kv_lora_rank + rope]    slot s -> row s of the
    [num_blocks * block_size, row] view;  s < 0 (CUDA-graph padding): skipped

An fp8 cache stores clamp(latent / kv_scale) with one scale for the whole row, read back as
stored * kv_scale (as reshape_and_cache.py does for K and V).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.grid import cdiv, next_power_of_2
from atom.kernels.paged_attention import FP8_DTYPES
from atom.kernels.reshape_and_cache import _store_scaled, divide_by_scale


def write_latent_cache_ref(
    latent: Tensor, kv_cache: Tensor, slot_mapping: Tensor, kv_scale: float = 1.0
) -> None:
    """latent [T, rank + rope] into kv_cache at slot_mapping [T], in place; slots < 0 skipped."""
    keep = slot_mapping >= 0  # negative slots: CUDA-graph padding rows
    latent, slots = latent[keep], slot_mapping[keep]
    cache = kv_cache.view(-1, kv_cache.shape[-1])  # [num_blocks * block_size, row]
    if cache.dtype in FP8_DTYPES:
        fp8_max = torch.finfo(cache.dtype).max
        latent = divide_by_scale(latent.float(), kv_scale).clamp(-fp8_max, fp8_max).to(cache.dtype)
        cache.view(torch.uint8).index_copy_(0, slots, latent.view(torch.uint8))
    else:
        cache.index_copy_(0, slots, latent.to(cache.dtype))


@triton.jit
def _write_latent_kernel(
    latent_ptr,  # [T, row] (any token stride)
    cache_ptr,  # [num_slots, row] contiguous
    slot_ptr,  # [T] int64
    stride_lt,
    row_size,
    kv_scale,
    fp8_max,
    IS_FP8: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.where(slot >= 0, row_size, 0)  # a negative slot (padding) writes nothing
    src = latent_ptr + token * stride_lt + offs
    _store_scaled(src, cache_ptr, slot * row_size + offs, mask, kv_scale, fp8_max, IS_FP8)


def write_latent_cache(
    latent: Tensor, kv_cache: Tensor, slot_mapping: Tensor, kv_scale: float = 1.0
) -> None:
    """latent [T, R + P] into the contiguous kv_cache at slot_mapping [T], in place; slots < 0 are
    skipped (CUDA-graph padding). An fp8 cache stores clamp(latent / kv_scale)."""
    num_tokens, row_size = latent.shape
    if kv_cache.shape[-1] != row_size or not kv_cache.is_contiguous():
        raise ValueError(f"latent {tuple(latent.shape)} does not fit cache {tuple(kv_cache.shape)}")
    if num_tokens == 0:
        return
    latent = latent if latent.stride(1) == 1 else latent.contiguous()
    is_fp8 = kv_cache.dtype in FP8_DTYPES
    block = min(1024, next_power_of_2(row_size))
    _write_latent_kernel[(num_tokens, cdiv(row_size, block))](
        latent, kv_cache, slot_mapping, latent.stride(0), row_size, kv_scale,
        torch.finfo(kv_cache.dtype).max if is_fp8 else 0.0, IS_FP8=is_fp8, BLOCK=block,
        num_warps=4,
    )  # fmt: skip
