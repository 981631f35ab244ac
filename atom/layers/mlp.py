"""The gated MLP of Llama-style models: down(silu(gate(x)) * up(x)), the gate/up GEMM and its
SiLU-and-mul one module and one op (linear_ops.linear_silu_and_mul: one kernel where gemv runs the
GEMM and ATOM_GEMV_SILU=1)."""

from __future__ import annotations

from torch import Tensor, nn

from atom.kernels import linear_ops
from atom.layers.activation import check_gated_act
from atom.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from atom.layers.norm import NormedRows


class GateUpSiluLinear(MergedColumnParallelLinear):
    """The gate and up projections with SwiGLU's SiLU-and-mul applied: [..., H] -> [..., I]
    (each rank's weight: its gate rows, then its up rows)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__(hidden_size, [intermediate_size, intermediate_size], bias=bias)

    def forward(self, x: Tensor | NormedRows) -> Tensor:
        if isinstance(x, NormedRows):
            return linear_ops.linear_silu_and_mul(x.rows, self.weight, self.bias, x.sumsq, x.eps)
        return linear_ops.linear_silu_and_mul(x, self.weight, self.bias)


class GatedMLP(nn.Module):
    def __init__(
        self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False
    ) -> None:
        super().__init__()
        check_gated_act(hidden_act)
        self.gate_up_proj = GateUpSiluLinear(hidden_size, intermediate_size, bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: Tensor | NormedRows) -> Tensor:
        return self.down_proj(self.gate_up_proj(x))
