"""Rotary embedding: the kernel (the interpreter without a GPU) against the reference, and the
layer's cos/sin cache (llama3, yarn folded in) against transformers' own rotary."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from atom.kernels.rotary import (
    rotary_and_cache,
    rotary_and_cache_ref,
    rotary_embedding,
    rotary_embedding_ref,
)
from atom.layers.rotary import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=1e-3)}
MAX_POSITION = 300


def _qk(
    num_tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, heads, D] and k [T, kv_heads, D] as views into one fused qkv output, as models pass."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(device=DEVICE, dtype=dtype)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(
        num_tokens, kv_heads, head_dim
    )
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("is_neox_style", [True, False])
@pytest.mark.parametrize(
    ("num_tokens", "heads", "kv_heads", "head_dim", "rotary_dim"),
    [(1, 4, 2, 64, 64), (7, 3, 1, 96, 32), (17, 8, 2, 128, 128), (5, 40, 8, 80, 40)],
)
def test_rotary_embedding(
    num_tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    is_neox_style: bool,
    dtype: torch.dtype,
) -> None:
    q, k = _qk(num_tokens, heads, kv_heads, head_dim, dtype, seed=head_dim + num_tokens)
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(MAX_POSITION, rotary_dim, generator=gen).to(DEVICE)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen).to(DEVICE)
    q0, k0 = q.clone(), k.clone()
    q_out, k_out = rotary_embedding(positions, q, k, cache, rotary_dim, is_neox_style)
    q_ref, k_ref = rotary_embedding_ref(positions, q, k, cache, rotary_dim, is_neox_style)
    torch.testing.assert_close(q_out, q_ref, **TOL[dtype])
    torch.testing.assert_close(k_out, k_ref, **TOL[dtype])
    assert torch.equal(q, q0) and torch.equal(k, k0)  # out of place
    # the pass-through tail is copied bit for bit
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("is_neox_style", [True, False])
@pytest.mark.parametrize(
    ("num_tokens", "heads", "kv_heads", "head_dim", "rotary_dim"),
    [(1, 4, 2, 64, 64), (7, 3, 1, 96, 32), (17, 16, 8, 128, 128), (5, 12, 4, 80, 40)],
)
def test_qk_norm_rotary(
    num_tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    is_neox_style: bool,
    dtype: torch.dtype,
) -> None:
    """The per-head RMSNorm of q and k, then rotary, in one kernel: the chain of references (a
    partial rotary's tail is normed too). Both round the normed values to the dtype, but their
    sums of squares add in different orders: a value may round one ulp apart (float16: 2e-3 at
    the normed values' magnitude of ~4)."""
    q, k = _qk(num_tokens, heads, kv_heads, head_dim, dtype, seed=head_dim + num_tokens)
    gen = torch.Generator().manual_seed(1)
    angles = torch.rand(MAX_POSITION, rotary_dim // 2, generator=gen) * 100
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1).to(DEVICE)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen).to(DEVICE)
    q_w, k_w = (torch.rand(head_dim, generator=gen).add(0.5).to(DEVICE, dtype) for _ in range(2))
    q0, k0 = q.clone(), k.clone()
    args = (cache, rotary_dim, is_neox_style, (q_w, k_w, 1e-6))
    q_out, k_out = rotary_embedding(positions, q, k, *args)
    q_ref, k_ref = rotary_embedding_ref(positions, q, k, *args)
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=5e-3, rtol=2e-3)
    torch.testing.assert_close(q_out, q_ref, **tol)
    torch.testing.assert_close(k_out, k_ref, **tol)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # out of place
    with pytest.raises(ValueError, match="norm weights"):
        rotary_embedding(positions, q, k, *args[:3], (q_w[:-1], k_w, 1e-6))


# fp8 caches on a GPU only: the interpreter's float8_e4m3fn conversion is wrong.
CACHE_DTYPES = [None, torch.float8_e4m3fn] if DEVICE == "cuda" else [None]


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)  # None: the model dtype
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize(
    ("num_tokens", "heads", "kv_heads", "head_dim", "rotary_dim", "is_neox_style", "block_size"),
    [(1, 4, 2, 64, 64, True, 16), (7, 3, 1, 96, 32, False, 4), (19, 16, 8, 128, 128, True, 16)],
)
def test_rotary_and_cache(
    num_tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    is_neox_style: bool,
    block_size: int,
    norm: bool,
    dtype: torch.dtype,
    cache_dtype: torch.dtype | None,
) -> None:
    """Rotary (after the q/k norms) with k and v written into the paged cache: the chain of
    references. Shuffled slots, every third one -1 (a graph's padding row: nothing written)."""
    q, k = _qk(num_tokens, heads, kv_heads, head_dim, dtype, seed=head_dim + num_tokens)
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(num_tokens, kv_heads + 1, head_dim, generator=gen).to(DEVICE, dtype)[:, 1:]
    angles = torch.rand(MAX_POSITION, rotary_dim // 2, generator=gen) * 100
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(DEVICE)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen).to(DEVICE)
    weights = [torch.rand(head_dim, generator=gen).add(0.5).to(DEVICE, dtype) for _ in range(2)]
    num_blocks = -(-num_tokens // block_size) + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1
    slots = slots.to(DEVICE)
    shape = (2, num_blocks, block_size, kv_heads, head_dim)
    expected = torch.full(shape, 7.0, device=DEVICE).to(cache_dtype or dtype)
    cache = expected.clone()
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    args = (cos_sin, rotary_dim, is_neox_style, 0.5, 2.0, (*weights, 1e-6) if norm else None)
    q_out = rotary_and_cache(positions, q, k, v, cache, slots, *args)
    q_ref = rotary_and_cache_ref(positions, q, k, v, expected, slots, *args)
    tol = dict(atol=5e-3, rtol=2e-3) if norm and dtype == torch.float16 else TOL[dtype]
    torch.testing.assert_close(q_out, q_ref, **tol)
    if cache_dtype is None:
        torch.testing.assert_close(cache, expected, **tol)
    else:  # one fp8 step (1/8 relative) apart where the rotated k rounded one ulp apart
        torch.testing.assert_close(cache.float(), expected.float(), atol=2e-2, rtol=0.13)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)
    written = (slots >= 0).nonzero().squeeze(1)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots[written]] = False
    assert bool((cache.float().flatten(1, 2)[:, untouched] == 7.0).all())
    with pytest.raises(ValueError, match="do not fit cache"):
        rotary_and_cache(positions, q, k, v[..., :-1], cache, slots, *args)


ROPE_PARAMETERS: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


@pytest.mark.parametrize("rope", list(ROPE_PARAMETERS))
def test_layer_matches_transformers(rope: str) -> None:
    """float32: the layer (ops path) and the kernel on the layer's cache, against HF's rotary."""
    config = transformers.LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=MAX_POSITION,
        rope_parameters=ROPE_PARAMETERS[rope],
    )
    num_tokens = 37
    q, k = _qk(num_tokens, 4, 2, 64, torch.float32, seed=1)
    positions = torch.randperm(MAX_POSITION, generator=torch.Generator().manual_seed(2))
    positions = positions[:num_tokens].to(DEVICE)

    hf_rope = LlamaRotaryEmbedding(config).to(DEVICE)
    cos, sin = hf_rope(q, positions[None])  # [1, T, D]
    # HF layout: [batch, heads, T, D]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    hf_q, hf_k = hf_q[0].transpose(0, 1), hf_k[0].transpose(0, 1)

    with torch.device(DEVICE):
        layer = RotaryEmbedding(config, head_dim=64, max_position=MAX_POSITION)
    for q_out, k_out in (
        layer(positions, q, k),
        rotary_embedding(positions, q, k, layer.cos_sin_cache, layer.rotary_dim, True),
    ):
        torch.testing.assert_close(q_out, hf_q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k_out, hf_k, atol=1e-5, rtol=1e-5)


def test_layers_with_equal_frequencies_share_one_cache() -> None:
    """One cos/sin tensor per distinct rope (an 8B Llama's per-layer copies were 2 GiB)."""
    config = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=MAX_POSITION
    )
    other = transformers.LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        head_dim=64,
        max_position_embeddings=MAX_POSITION,
        rope_parameters=ROPE_PARAMETERS["yarn"],
    )
    a, b = (RotaryEmbedding(config, 64, MAX_POSITION) for _ in range(2))
    assert a.cos_sin_cache is b.cos_sin_cache
    assert RotaryEmbedding(config, 64, 2 * MAX_POSITION).cos_sin_cache is not a.cos_sin_cache
    assert RotaryEmbedding(other, 64, MAX_POSITION).cos_sin_cache is not a.cos_sin_cache
    with torch.device("meta"):
        assert RotaryEmbedding(config, 64, MAX_POSITION).cos_sin_cache.device.type == "meta"
