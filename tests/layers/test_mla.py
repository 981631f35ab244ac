"""MLAAttention through the paged latent cache: chunked prefills, decode rows and padding in mixed
steps give what one causal pass over each whole sequence gives. Run twice: with the CPU path
(torch loop) and with the CUDA path's kernels (the Triton interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

from atom.executor.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from atom.kernels import latent_cache, ops
from atom.kernels import mla_attention as mla_kernels
from atom.kernels.mla_reference import mla_expanded_ref
from atom.layers.mla import MLAAttention

HEADS, RANK, NOPE, ROPE, V_DIM, BLOCK = 4, 32, 16, 16, 24, 16
SCALE = (NOPE + ROPE) ** -0.5
# Per step, the query tokens of each sequence: prompts (one in two chunks), then decode rows; the
# last sequence is a padding row (seq_len 0, slot -1) as in a CUDA-graph batch.
STEPS = [[17, 23, 1, 0], [1, 17, 1, 0], [1, 1, 0, 1]]
LENGTHS = [19, 41, 2, 0]  # each sequence's context after the last step


def _triton_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ops picks on CUDA, on CPU tensors: the kernels run in the interpreter."""

    def attention(q, kv_cache, meta, w_kv_b, nope_dim, v_dim, scale, kv_scale, out) -> None:  # type: ignore[no-untyped-def]
        mla_kernels.mla_paged_attention(
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.max_query_len, meta.max_seq_len, w_kv_b, nope_dim, v_dim, scale, kv_scale, out,
        )  # fmt: skip

    monkeypatch.setattr(ops, "write_latent_cache", latent_cache.write_latent_cache)
    monkeypatch.setattr(ops, "mla_attention", attention)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_paged_steps_match_whole_sequences(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "triton":
        _triton_dispatch(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    q_all = [torch.randn(n, HEADS, NOPE + ROPE, generator=gen) for n in LENGTHS]
    latent_all = [torch.randn(n, RANK + ROPE, generator=gen) for n in LENGTHS]
    w_kv_b = torch.randn(HEADS * (NOPE + V_DIM), RANK, generator=gen) * RANK**-0.5
    layer = MLAAttention(HEADS, RANK, NOPE, ROPE, V_DIM, SCALE)
    layer.kv_cache = torch.full(layer.kv_cache_shape(12, BLOCK), float("nan"))
    tables = torch.tensor([[7, 2, 0], [1, 9, 4], [11, 0, 0], [0, 0, 0]], dtype=torch.int32)
    done = [0, 0, 0, 0]
    for counts in STEPS:
        qsl, seq_lens, slots, q, latent = [0], [], [], [], []
        for i, n in enumerate(counts):
            padding = LENGTHS[i] == 0
            qsl.append(qsl[-1] + n)
            seq_lens.append(0 if padding else done[i] + n)
            q.append(torch.randn(n, HEADS, NOPE + ROPE) if padding else q_all[i][done[i] :][:n])
            latent.append(torch.randn(n, RANK + ROPE) if padding else latent_all[i][done[i] :][:n])
            pos = torch.arange(done[i], done[i] + n)
            slot = tables[i, pos // BLOCK].long() * BLOCK + pos % BLOCK
            slots.append(torch.full_like(slot, -1) if padding else slot)
        meta = AttentionMetadata(
            torch.cat(slots), tables, torch.tensor(seq_lens, dtype=torch.int32),
            torch.tensor(qsl, dtype=torch.int32), seq_lens, qsl, max(counts), max(seq_lens),
        )  # fmt: skip
        with set_forward_context(ForwardContext([], meta)):
            out = layer(torch.cat(q), torch.cat(latent), w_kv_b)
        for i, n in enumerate(counts):
            if LENGTHS[i] == 0:
                assert torch.equal(out[qsl[i] : qsl[i + 1]], torch.zeros(n, HEADS, V_DIM))
                continue
            rows = slice(done[i], done[i] + n)
            whole = mla_expanded_ref(q_all[i], latent_all[i], w_kv_b, NOPE, V_DIM, SCALE)
            torch.testing.assert_close(out[qsl[i] : qsl[i + 1]], whole[rows], atol=1e-5, rtol=1e-5)
            done[i] += n
    assert done == LENGTHS
