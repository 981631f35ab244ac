"""Attention through the paged KV cache: chunked prefills, decode rows and a padding row in mixed
steps give what one causal pass over each whole sequence gives, with the layer's own rope (and
Qwen3's q/k norms) fused into its cache write, and without a rope. Run with the CPU path (torch
references) and with the CUDA path's rotary/cache kernels (the Triton interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch
import transformers

from atom.executor.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from atom.kernels import ops
from atom.kernels import reshape_and_cache as cache_kernels
from atom.kernels import rotary as rotary_kernels
from atom.kernels.paged_attention import sdpa
from atom.layers.attention import Attention
from atom.layers.norm import RMSNorm
from atom.layers.rotary import RotaryEmbedding

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 16, 16
SCALE = HEAD_DIM**-0.5
# Per step, the query tokens of each sequence: prompts (one in two chunks), then decode rows; the
# last sequence is a padding row (seq_len 0, slot -1) as in a CUDA-graph batch.
STEPS = [[17, 23, 1, 0], [1, 17, 1, 0], [1, 1, 0, 1]]
LENGTHS = [19, 41, 2, 0]  # each sequence's context after the last step


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
    layer.kv_cache = torch.full(layer.kv_cache_shape(12, BLOCK), float("nan"))
    gen = torch.Generator().manual_seed(0)
    q_all, k_all, v_all = (
        [torch.randn(n, h, HEAD_DIM, generator=gen) for n in LENGTHS]
        for h in (HEADS, KV_HEADS, KV_HEADS)
    )
    tables = torch.tensor([[7, 2, 0], [1, 9, 4], [11, 0, 0], [0, 0, 0]], dtype=torch.int32)
    done = [0, 0, 0, 0]
    for counts in STEPS:
        qsl, seq_lens, slots, positions, q, k, v = [0], [], [], [], [], [], []
        for i, n in enumerate(counts):
            padding = LENGTHS[i] == 0
            qsl.append(qsl[-1] + n)
            seq_lens.append(0 if padding else done[i] + n)
            for rows, whole, h in ((q, q_all, HEADS), (k, k_all, KV_HEADS), (v, v_all, KV_HEADS)):
                rows.append(torch.randn(n, h, HEAD_DIM) if padding else whole[i][done[i] :][:n])
            pos = torch.arange(done[i], done[i] + n)
            positions.append(torch.zeros_like(pos) if padding else pos)
            slot = tables[i, pos // BLOCK].long() * BLOCK + pos % BLOCK
            slots.append(torch.full_like(slot, -1) if padding else slot)
        meta = AttentionMetadata(
            torch.cat(slots), tables, torch.tensor(seq_lens, dtype=torch.int32),
            torch.tensor(qsl, dtype=torch.int32), seq_lens, qsl, max(counts), max(seq_lens),
        )  # fmt: skip
        args = (torch.cat(q), torch.cat(k), torch.cat(v))
        with set_forward_context(ForwardContext([], meta)):
            out = layer(*args, torch.cat(positions) if rotary is not None else None)
        for i, n in enumerate(counts):
            if LENGTHS[i] == 0:
                assert torch.equal(out[qsl[i] : qsl[i + 1]], torch.zeros(n, HEADS, HEAD_DIM))
                continue
            whole_q, whole_k = q_all[i], k_all[i]
            if rotary is not None:
                whole_pos = torch.arange(LENGTHS[i])
                whole_q, whole_k = rotary(whole_pos, whole_q, whole_k, *(norms or (None, None)))
            whole = sdpa(whole_q, whole_k, v_all[i], SCALE)
            rows = slice(done[i], done[i] + n)
            torch.testing.assert_close(out[qsl[i] : qsl[i + 1]], whole[rows], atol=1e-5, rtol=1e-5)
            done[i] += n
    assert done == LENGTHS


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
