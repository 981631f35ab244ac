"""reshape_and_cache: the kernel (the interpreter without a GPU) against the reference, and the
reference against the slot layout written out by hand. fp8 runs the kernel on a GPU only: the
interpreter's float8_e4m3fn conversion is wrong (values off by a power of two)."""

from __future__ import annotations

import pytest
import torch

from atom.kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = 7.0  # cache entries nobody wrote keep this


def _case(
    num_tokens: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    num_blocks: int,
    dtype: torch.dtype,
    seed: int,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, v [T, kv_heads, D] as views of a fused qkv output; slots shuffled, every 3rd one -1."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(num_tokens, 3 * kv_heads * head_dim, generator=gen) * scale
    kv = kv.to(device=DEVICE, dtype=dtype)
    k = kv[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(num_tokens, kv_heads, head_dim)
    v = kv[:, 2 * kv_heads * head_dim :].view(num_tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1  # padding rows of a CUDA-graph batch
    return k, v, slots.to(DEVICE)


def _empty_cache(
    num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    shape = (2, num_blocks, block_size, kv_heads, head_dim)
    return torch.full(shape, SENTINEL, device=DEVICE).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("num_tokens", "kv_heads", "head_dim", "block_size"),
    [(1, 1, 64, 16), (7, 2, 24, 4), (40, 3, 128, 16), (5, 8, 128, 1)],
)
def test_reshape_and_cache(
    num_tokens: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> None:
    num_blocks = -(-num_tokens // block_size) + 3
    k, v, slots = _case(num_tokens, kv_heads, head_dim, block_size, num_blocks, dtype, seed=7)
    expected = _empty_cache(num_blocks, block_size, kv_heads, head_dim, dtype)
    cache = expected.clone()
    reshape_and_cache_ref(k, v, expected, slots, 2.0, 0.5)  # scales apply to fp8 caches only
    reshape_and_cache(k, v, cache, slots, 2.0, 0.5)
    assert torch.equal(cache, expected)


def test_reference_slot_layout() -> None:
    """Token t lands in block slot // block_size at offset slot % block_size; -1 writes nothing."""
    k, v, slots = _case(9, 2, 8, 4, 5, torch.float32, seed=3)
    cache = _empty_cache(5, 4, 2, 8, torch.float32)
    reshape_and_cache_ref(k, v, cache, slots)
    written = torch.zeros(5 * 4, dtype=torch.bool)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            written[slot] = True
            assert torch.equal(cache[0, slot // 4, slot % 4], k[t])
            assert torch.equal(cache[1, slot // 4, slot % 4], v[t])
    untouched = cache.flatten(1, 2)[:, ~written.to(DEVICE)]
    assert bool((untouched == SENTINEL).all())


def test_reference_fp8_clamps_and_skips() -> None:
    """fp8: stores clamp(x / scale, -448, 448) (a plain cast would give NaN); -1 slots untouched."""
    fp8 = torch.float8_e4m3fn
    k, v, slots = _case(12, 2, 32, 4, 5, torch.float32, seed=5, scale=200.0)
    cache = _empty_cache(5, 4, 2, 32, fp8)
    k_scale, v_scale = 0.25, 4.0
    reshape_and_cache_ref(k, v, cache, slots, k_scale, v_scale)
    keep = slots >= 0
    blocks, offsets = slots[keep] // 4, slots[keep] % 4
    stored_k = cache[0, blocks, offsets].float()  # fancy indexing of fp8 on the CPU: via float
    assert not bool(cache.float().isnan().any())
    torch.testing.assert_close(stored_k, (k[keep] / k_scale).clamp(-448, 448), atol=0, rtol=0.07)
    assert float(stored_k.abs().max()) == 448.0  # 200 sigma / 0.25: some values clamp
    torch.testing.assert_close(
        cache[1, blocks, offsets].float() * v_scale, v[keep], atol=v_scale / 64, rtol=0.07
    )
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert bool((cache.float().flatten(1, 2)[:, untouched] == SENTINEL).all())
