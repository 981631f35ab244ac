"""RMSNorm with the residual add fused in (one pass over the hidden states), and RMSNorm's rows on
their way into a linear layer (`NormedRows`), deferred at decode row counts into the GEMMs
around the norm (kernels/gemv_norm.py; RowParallelLinear.forward_add_norm runs a norm in the
linear layer before it)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from atom.kernels import linear_ops, ops


class NormedRows(NamedTuple):
    """An RMSNorm's output for the linear layer after it (linear layers and the attention's qkv
    projection take it): the normed rows, or where linear_ops.defers_norm (1-16 rows on CUDA)
    the rows times the norm's weight with their float32 sums of squares, which the linear layer
    turns into each row's 1/rms and applies to its sums."""

    rows: Tensor
    sumsq: Tensor
    eps: float


class RMSNorm(nn.Module):
    traced_methods = ("rows",)  # --mark-trace tags it too (executor/profiling.py)

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (norm(x + residual), x + residual); with no residual, x is the residual."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps), x
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)

    def norm(self, x: Tensor) -> Tensor:
        """x [..., hidden_size] -> normed; also per-head views [T, heads, head_dim] (q/k norm)."""
        return ops.rms_norm(x, self.weight, self.eps)

    def rows(self, x: Tensor) -> NormedRows:
        """norm(x) for a linear layer after it."""
        return NormedRows(*linear_ops.rms_norm_rows(x, self.weight, self.eps), self.eps)
