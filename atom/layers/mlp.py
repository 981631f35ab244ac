"""The gated MLP of Llama-style models: down(silu(gate(x)) * up(x)). SwiGLU's SiLU-and-mul runs
as its own kernel after the gate/up GEMM, or fused into a gemv launch where gemv runs: into the
gate/up GEMM's output (ops.linear_silu_and_mul, ATOM_GEMV_SILU=1) or into down_proj's input
tiles (ops.silu_and_mul_linear, ATOM_GEMV_SILU=down)."""

from __future__ import annotations

from torch import Tensor, nn

from atom.distributed import all_reduce
from atom.kernels import ops
from atom.layers.activation import check_gated_act
from atom.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class GateUpSiluLinear(MergedColumnParallelLinear):
    """The gate and up projections with SwiGLU's SiLU-and-mul applied: [..., H] -> [..., I]
    (each rank's weight: its gate rows, then its up rows)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__(hidden_size, [intermediate_size, intermediate_size], bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear_silu_and_mul(x, self.weight, self.bias)

    def gate_up(self, x: Tensor) -> Tensor:
        """[..., H] -> [..., 2I]: the gate, then the up projection, no SiLU-and-mul."""
        return ops.linear(x, self.weight, self.bias)


class SiluDownLinear(RowParallelLinear):
    """down_proj; `silu_forward` takes the gate/up GEMM's [..., 2I] and applies SwiGLU's
    SiLU-and-mul on the way in."""

    def silu_forward(self, gate_up: Tensor) -> Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        return all_reduce(ops.silu_and_mul_linear(gate_up, self.weight, bias))


class GatedMLP(nn.Module):
    def __init__(
        self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False
    ) -> None:
        super().__init__()
        check_gated_act(hidden_act)
        self.gate_up_proj = GateUpSiluLinear(hidden_size, intermediate_size, bias)
        self.down_proj = SiluDownLinear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if ops.silu_in_down(x.device):
            return self.down_proj.silu_forward(self.gate_up_proj.gate_up(x))
        return self.down_proj(self.gate_up_proj(x))
