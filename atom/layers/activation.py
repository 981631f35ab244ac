"""Gated activations."""

from __future__ import annotations

from torch import Tensor, nn

from atom.kernels import ops


class SiluAndMul(nn.Module):
    """[..., 2 * d] -> silu(x[..., :d]) * x[..., d:]"""

    def forward(self, x: Tensor) -> Tensor:
        return ops.silu_and_mul(x)


def get_act_and_mul(name: str) -> nn.Module:
    if name in ("silu", "swiglu"):
        return SiluAndMul()
    raise ValueError(f"unsupported hidden_act {name!r}")
