"""Attention through the paged KV cache: mixed steps (paged_steps.py) give what one causal pass
over each whole sequence gives, with the layer's own rope (and
Qwen3's q/k norms) fused into its cache write, and without a rope. Run with the CPU path (torch
references) and with the CUDA path's rotary/cache kernels (the Triton interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch
import transformers

from atom.executor.forward_context import ForwardContext, set_forward_context
from atom.kernels import ops
from atom.kernels import reshape_and_cache as cache_kernels
from atom.kernels import rotary as rotary_kernels
from atom.kernels.paged_attention import sdpa
from atom.layers.attention import Attention
from atom.layers.norm import RMSNorm
from atom.layers.rotary import RotaryEmbedding

from .paged_steps import BLOCK, LENGTHS, NUM_BLOCKS, paged_steps

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
SCALE = HEAD_DIM**-0.5


def _triton_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ops picks on CUDA for the cache writes, on CPU tensors (attention stays torch)."""
    monkeypatch.setattr(ops, "rotary_and_cache", rotary_kernels.rotary_and_cache)
    monkeypatch.setattr(ops, "reshape_and_cache", cache_kernels.reshape_and_cache)


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("rope", ["none", "rope", "rope+norm"])
def test_paged_steps_match_whole_sequences(
    rope: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "triton":
        _triton_dispatch(monkeypatch)
    config = transformers.LlamaConfig(head_dim=HEAD_DIM, max_position_embeddings=64)
    rotary = RotaryEmbedding(config, HEAD_DIM, 64) if rope != "none" else None
    norms = None
    if rope == "rope+norm":
        norms = (RMSNorm(HEAD_DIM, 1e-6), RMSNorm(HEAD_DIM, 1e-6))
        for i, norm in enumerate(norms):
            norm.weight.data = (
                torch.rand(HEAD_DIM, generator=torch.Generator().manual_seed(i)) + 0.5
            )
    layer = Attention(HEADS, HEAD_DIM, SCALE, KV_HEADS, rope=rotary, qk_norm=norms)
    layer.kv_cache = torch.full(layer.kv_cache_shape(NUM_BLOCKS, BLOCK), float("nan"))
    gen = torch.Generator().manual_seed(0)
    q_all, k_all, v_all = (
        [torch.randn(n, h, HEAD_DIM, generator=gen) for n in LENGTHS]
        for h in (HEADS, KV_HEADS, KV_HEADS)
    )
    wholes = []  # each sequence's attention in one causal pass
    for q, k, v in zip(q_all, k_all, v_all, strict=True):
        if rotary is not None:
            q, k = rotary(torch.arange(len(q)), q, k, *(norms or (None, None)))
        wholes.append(sdpa(q, k, v, SCALE))
    for step in paged_steps():
        args = (step.gather(q_all), step.gather(k_all), step.gather(v_all))
        with set_forward_context(ForwardContext([], step.meta)):
            out = layer(*args, step.positions if rotary is not None else None)
        qsl = step.meta.query_start_loc_cpu
        for i, rows in enumerate(step.rows):
            got = out[qsl[i] : qsl[i + 1]]
            if rows is None:
                assert torch.equal(got, torch.zeros_like(got))
            else:
                torch.testing.assert_close(got, wholes[i][rows], atol=1e-5, rtol=1e-5)


def test_positions_go_with_a_rope_only() -> None:
    config = transformers.LlamaConfig(head_dim=HEAD_DIM, max_position_embeddings=64)
    plain = Attention(HEADS, HEAD_DIM, SCALE, KV_HEADS)
    roped = Attention(HEADS, HEAD_DIM, SCALE, KV_HEADS, rope=RotaryEmbedding(config, HEAD_DIM, 64))
    q, kv = torch.randn(3, HEADS, HEAD_DIM), torch.randn(3, KV_HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="positions go with a rope"):
        plain(q, kv, kv, torch.arange(3))
    with pytest.raises(ValueError, match="positions go with a rope"):
        roped(q, kv, kv)
    # The rope and norms stay registered (and named) in the model's module, not the layer's.
    norms = (RMSNorm(HEAD_DIM, 1e-6), RMSNorm(HEAD_DIM, 1e-6))
    normed = Attention(HEADS, HEAD_DIM, SCALE, KV_HEADS, rope=roped.rope[0], qk_norm=norms)
    assert not list(normed.parameters()) and not list(normed.buffers())
