"""gemv with rotary and the KV-cache write in its epilogue (Triton; the interpreter without a
GPU) against the chain of references: the projection, then rotary_and_cache_ref. Odd row
counts, splits of K, shuffled slots with padding rows, per-head q/k norms."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from atom.kernels import gemv_rope as gemv_rope_module
from atom.kernels.gemv import MAX_M, GemvConfig, gemv_config
from atom.kernels.gemv_rope import fuses, gemv_rope_and_cache, gemv_rope_and_cache_ref, rope_tile

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_POSITION = 300
# The interpreter mishandles bfloat16 and float8_e4m3fn: those run on a GPU only.
GPU_ONLY = pytest.mark.skipif(DEVICE == "cpu", reason="GPU only")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=GPU_ONLY)]
CACHE_DTYPES = [None, pytest.param(torch.float8_e4m3fn, marks=GPU_ONLY)]


def _case(rows: int, heads: int, kv_heads: int, head_dim: int, hidden: int, dtype: torch.dtype,
          cache_dtype: torch.dtype | None, seed: int):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn((heads + 2 * kv_heads) * head_dim, hidden, generator=gen)
              / hidden**0.5).to(DEVICE, dtype)  # fmt: skip
    angles = torch.rand(MAX_POSITION, head_dim // 2, generator=gen) * 100
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(DEVICE)
    positions = torch.randint(0, MAX_POSITION, (rows,), generator=gen).to(DEVICE)
    block_size = 16
    num_blocks = -(-rows // block_size) + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:rows]
    slots[1::3] = -1  # a graph's padding rows: nothing written
    norms = [torch.rand(head_dim, generator=gen).add(0.5).to(DEVICE, dtype) for _ in range(2)]
    shape = (2, num_blocks, block_size, kv_heads, head_dim)
    cache = torch.full(shape, 7.0, device=DEVICE).to(cache_dtype or dtype)
    return x, weight, positions, cache, slots.to(DEVICE), cos_sin, norms


TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}  # fmt: skip


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("norm", "row_scale"), [(False, False), (False, True), (True, False), (True, True)]
)
@pytest.mark.parametrize(
    ("rows", "heads", "kv_heads", "head_dim", "hidden", "split_k"),
    [(1, 4, 2, 64, 96, 1), (5, 3, 1, 32, 200, 3), (MAX_M, 2, 2, 64, 136, 2)],
)
def test_matches_the_chain_of_references(
    rows: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    hidden: int,
    split_k: int,
    norm: bool,
    row_scale: bool,
    dtype: torch.dtype,
    cache_dtype: torch.dtype | None,
) -> None:
    """row_scale: x is a deferred RMSNorm's rows (kernels/gemv_norm.py), 3 partial sums a row."""
    x, weight, positions, cache, slots, cos_sin, norms = _case(
        rows, heads, kv_heads, head_dim, hidden, dtype, cache_dtype, seed=rows + head_dim
    )
    expected = cache.clone()
    args = (cos_sin, heads, kv_heads, 0.5, 2.0, (*norms, 1e-6) if norm else None)
    config = GemvConfig(block_n=head_dim, block_k=32, split_k=split_k, num_stages=2)
    scale = None
    if row_scale:
        sums = torch.rand(rows, 3, generator=torch.Generator().manual_seed(rows)) * hidden
        scale = (sums.to(DEVICE), 1e-5)
    q = gemv_rope_and_cache(x, weight, positions, cache, slots, *args, config=config,
                            row_scale=scale)  # fmt: skip
    q_ref = gemv_rope_and_cache_ref(x, weight, positions, expected, slots, *args, row_scale=scale)
    assert q.shape == (rows, heads, head_dim) and q.dtype == dtype
    tol = dict(atol=5e-3, rtol=2e-3) if norm and dtype == torch.float16 else TOL[dtype]
    torch.testing.assert_close(q, q_ref, **tol)
    if cache_dtype is None:
        torch.testing.assert_close(cache, expected, **tol)
    else:  # one fp8 step (1/8 relative) apart where the rotated k rounded one ulp apart
        torch.testing.assert_close(cache.float(), expected.float(), atol=2e-2, rtol=0.13)
    untouched = torch.ones(cache.shape[1] * cache.shape[2], dtype=torch.bool, device=DEVICE)
    untouched[slots[slots >= 0]] = False
    assert bool((cache.float().flatten(1, 2)[:, untouched] == 7.0).all())  # padding rows too


def test_default_tile() -> None:
    """Without a config: linear_config's tile (gemv_config's rule here) made one head of rows; x
    with strided features."""
    x, weight, positions, cache, slots, cos_sin, norms = _case(
        7, 4, 2, 64, 256, torch.float32, None, seed=11
    )
    expected = cache.clone()
    args = (cos_sin, 4, 2, 1.0, 1.0, (*norms, 1e-6))
    strided = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=DEVICE)[:, ::2]
    strided.copy_(x)  # features two apart: copied to contiguous rows first
    q = gemv_rope_and_cache(strided, weight, positions, cache, slots, *args)
    q_ref = gemv_rope_and_cache_ref(x, weight, positions, expected, slots, *args)
    torch.testing.assert_close(q, q_ref, **TOL[torch.float32])
    torch.testing.assert_close(cache, expected, **TOL[torch.float32])


def test_a_second_launch_finds_the_counters_rearmed() -> None:
    """Split launches leave their tile counters at 0: the same launch twice, the same result."""
    x, weight, positions, cache, slots, cos_sin, _ = _case(
        3, 2, 1, 32, 96, torch.float32, None, seed=5
    )
    config = GemvConfig(block_n=32, block_k=16, split_k=4, num_stages=2)
    args = (cos_sin, 2, 1)
    first = gemv_rope_and_cache(x, weight, positions, cache, slots, *args, config=config)
    cache_after = cache.clone()
    second = gemv_rope_and_cache(x, weight, positions, cache, slots, *args, config=config)
    assert torch.equal(first, second) and torch.equal(cache, cache_after)


def test_rope_tile_makes_a_head_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # Llama-3.1-8B's qkv tile at 1-16 rows: 64 x 128, split 2 -> a head of 128 rows
    cfg = GemvConfig(64, 128, 4, 4, split_k=2)
    assert rope_tile(cfg, 128) == dataclasses.replace(cfg, block_n=128)
    assert rope_tile(gemv_config(6144, 4096), 128).block_n == 128
    # Qwen3-0.6B's 64 x 256, four stages: 128 x 256 would not fit, 128 x 128 does
    assert rope_tile(GemvConfig(64, 256, 4, 4), 128).block_k == 128
    assert rope_tile(GemvConfig(64, 256, 4, 4), 128, itemsize=4).block_k == 64  # float32
    monkeypatch.setattr(gemv_rope_module, "ROPE", "128:4:3")
    assert rope_tile(cfg, 128) == dataclasses.replace(
        cfg, block_n=128, block_k=128, split_k=4, num_stages=3
    )


def test_fuses_only_what_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = torch.empty(8 * 128, 256, device=DEVICE, dtype=torch.float16)
    assert fuses(1, weight, 128, 128, True) and fuses(MAX_M, weight, 128, 128, True)
    assert not fuses(MAX_M + 1, weight, 128, 128, True)  # past one row tile
    assert not fuses(1, weight, 128, 128, False)  # gpt-j pairs
    assert not fuses(1, weight, 128, 64, True)  # partial rotary
    assert not fuses(1, torch.empty(8 * 96, 256, device=DEVICE), 96, 96, True)  # 96-dim heads
    unaligned = torch.empty(8 * 128, 257, device=DEVICE, dtype=torch.float16)[:, :256]
    assert not fuses(1, unaligned, 128, 128, True)  # rows a descriptor cannot copy
    monkeypatch.setattr(gemv_rope_module, "ROPE", "0")
    assert not fuses(1, weight, 128, 128, True)


def test_bad_shapes() -> None:
    x, weight, positions, cache, slots, cos_sin, _ = _case(
        2, 2, 1, 32, 64, torch.float32, None, seed=1
    )
    with pytest.raises(ValueError, match="no qkv of those heads"):
        gemv_rope_and_cache(x, weight, positions, cache, slots, cos_sin, 3, 1)
    with pytest.raises(ValueError, match="whole head"):
        gemv_rope_and_cache(x, weight, positions, cache, slots, cos_sin[:, :16], 2, 1)
    with pytest.raises(ValueError, match="positions and slots"):
        gemv_rope_and_cache(x, weight, positions[:1], cache, slots, cos_sin, 2, 1)
