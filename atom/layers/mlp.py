"""The gated MLP of Llama-style models: down(act(gate(x)) * up(x)), the gate/up GEMM and its
SiLU-and-mul one op (ops.linear_silu_and_mul: one kernel where gemv runs the GEMM)."""

from __future__ import annotations

from torch import Tensor, nn

from atom.kernels import ops
from atom.layers.activation import check_gated_act
from atom.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class GatedMLP(nn.Module):
    def __init__(
        self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False
    ) -> None:
        super().__init__()
        check_gated_act(hidden_act)
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias=bias
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        proj = self.gate_up_proj
        return self.down_proj(ops.linear_silu_and_mul(x, proj.weight, proj.bias))
