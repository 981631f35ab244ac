"""RMSNorm with the residual add fused in (one pass over the hidden states)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from atom.kernels import ops


class RMSNorm(nn.Module):
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
