"""RMSNorm with the residual add fused in (one pass over the hidden states)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """float32 inside, cast back; multiplies the weight in the input dtype as transformers does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns (norm(x + residual), x + residual); with no residual, x is the residual."""
        if residual is not None:
            x = x + residual
        return rms_norm_ref(x, self.weight, self.eps), x

    def norm(self, x: Tensor) -> Tensor:
        return rms_norm_ref(x, self.weight, self.eps)
