"""Comparing a Gumbel-max draw with the float32 reference's."""

from __future__ import annotations

import torch

from atom.kernels.sampling import gumbel_scores_ref


def assert_same_draw(
    out: torch.Tensor, logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor
) -> None:
    """out [B] is the reference's draw, or (on CUDA, whose kernel takes the hardware's log2, off
    by ~2^-22 relative) a token whose reference score ties the best within 1e-5 relative."""
    scores = gumbel_scores_ref(logits, temperature, uniform)
    best, expected = scores.max(dim=-1)
    differ = out != expected
    if differ.any():
        got = scores.gather(1, out.view(-1, 1)).squeeze(1)
        close = (best - got).abs() <= 1e-5 * best.abs().clamp(min=1.0)
        assert bool((close | ~differ).all()), (out[differ], expected[differ])
