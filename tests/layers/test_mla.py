"""MLAAttention through the paged latent cache: mixed steps (paged_steps.py) give what one causal
pass over each whole sequence gives. Run twice: with the CPU path (torch loop) and with the CUDA
path's kernels (the Triton interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

from atom.executor.forward_context import ForwardContext, set_forward_context
from atom.kernels import latent_cache, ops
from atom.kernels import mla_attention as mla_kernels
from atom.kernels.mla_reference import mla_expanded_ref
from atom.layers.mla import MLAAttention

from .paged_steps import BLOCK, LENGTHS, NUM_BLOCKS, paged_steps

HEADS, RANK, NOPE, ROPE, V_DIM = 4, 32, 16, 16, 24
SCALE = (NOPE + ROPE) ** -0.5


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
    layer.kv_cache = torch.full(layer.kv_cache_shape(NUM_BLOCKS, BLOCK), float("nan"))
    for step in paged_steps():
        with set_forward_context(ForwardContext([], step.meta)):
            out = layer(step.gather(q_all), step.gather(latent_all), w_kv_b)
        qsl = step.meta.query_start_loc_cpu
        for i, rows in enumerate(step.rows):
            got = out[qsl[i] : qsl[i + 1]]
            if rows is None:
                assert torch.equal(got, torch.zeros_like(got))
                continue
            whole = mla_expanded_ref(q_all[i], latent_all[i], w_kv_b, NOPE, V_DIM, SCALE)
            torch.testing.assert_close(got, whole[rows], atol=1e-5, rtol=1e-5)
