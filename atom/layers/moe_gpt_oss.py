"""GPT-OSS experts: biased expert MLPs with a clamped SwiGLU, routed by top-k then softmax.

Stacked like FusedMoE, the layout a grouped-GEMM kernel wants, plus one bias per projection:

    w13_weight [E, 2 * I/tp, H]   rows [0, I/tp) gate, rows [I/tp, 2 * I/tp) up
    w13_bias   [E, 2 * I/tp]
    w2_weight  [E, H, I/tp]       down
    w2_bias    [E, H]             added on rank 0 only: the all-reduce sums the partial outputs

Checkpoints hold gate_up_proj [E, H, 2I] (transposed, gate and up interleaved column by column),
gate_up_proj_bias [E, 2I], down_proj [E, I, H] and down_proj_bias [E, H]; the loader de-interleaves.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from atom.distributed import all_reduce, tp_rank, tp_world_size
from atom.kernels import ops
from atom.layers.linear import _copy_checked
from atom.layers.moe import compile_expert_kernels, routed_experts

# checkpoint name under "<prefix>.experts." -> parameter name
GPT_OSS_EXPERT_PARAMS = {
    "gate_up_proj": "w13_weight",
    "gate_up_proj_bias": "w13_bias",
    "down_proj": "w2_weight",
    "down_proj_bias": "w2_bias",
}


class GptOssExperts(nn.Module):
    """The routed experts of one GPT-OSS layer: router logits in, weighted expert sum out."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        top_k: int,
        alpha: float,
        limit: float,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} not in [1, {num_experts}]")
        self.tp_size, self.tp_rank = tp_world_size(), tp_rank()
        if intermediate_size % self.tp_size:
            raise ValueError(
                f"intermediate_size={intermediate_size} is not divisible by "
                f"tensor_parallel_size={self.tp_size}"
            )
        self.num_experts, self.top_k, self.alpha, self.limit = num_experts, top_k, alpha, limit
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.shard_size = size = intermediate_size // self.tp_size
        shapes = {
            "w13_weight": (num_experts, 2 * size, hidden_size),
            "w13_bias": (num_experts, 2 * size),
            "w2_weight": (num_experts, hidden_size, size),
            "w2_bias": (num_experts, hidden_size),
        }
        for name, shape in shapes.items():
            param = nn.Parameter(torch.empty(shape), requires_grad=False)
            param.weight_loader = self.weight_loader
            self.register_parameter(name, param)

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: object = None) -> int:
        """All experts at once, in the checkpoint's layout (see the module docstring)."""
        if loaded.shape[0] != self.num_experts:
            raise ValueError(f"{loaded.shape[0]} experts, expected {self.num_experts}")
        size, rank = self.shard_size, self.tp_rank
        if param is self.w2_bias:
            return _copy_checked(param.data, loaded, "w2_bias")
        if param is self.w2_weight:  # [E, I, H] -> this rank's [E, H, I/tp]
            src = loaded.narrow(1, rank * size, size).transpose(1, 2)
            return _copy_checked(param.data, src, "w2_weight")
        if loaded.shape[-1] != 2 * self.intermediate_size:
            raise ValueError(f"{loaded.shape[-1]} gate/up columns, expected 2 * intermediate")
        # Interleaved [..., 2I] columns: even gate, odd up; keep this rank's slice of each.
        gate = loaded[..., 0::2].narrow(-1, rank * size, size)
        up = loaded[..., 1::2].narrow(-1, rank * size, size)
        src = torch.cat([gate, up], dim=-1)  # [E, (H,) 2I/tp]
        if param is self.w13_weight:
            src = src.transpose(1, 2)  # [E, 2I/tp, H]
        return _copy_checked(param.data, src, "w13")

    def compile_kernels(self, max_tokens: int) -> None:
        compile_expert_kernels(
            self.w13_weight,
            self.w2_weight,
            self.top_k,
            max_tokens,
            self.w13_bias,
            self.w2_bias,
            "clamped_swiglu",
            self.alpha,
            self.limit,
        )

    def forward(self, hidden_states: Tensor, router_logits: Tensor) -> Tensor:
        # hidden_states [T, H], router_logits [T, E]
        topk_weights, topk_ids = ops.topk_softmax(router_logits, self.top_k)
        out = routed_experts(  # FusedMoE's, with biases and GPT-OSS's gate
            hidden_states,
            self.w13_weight,
            self.w2_weight,
            topk_weights,
            topk_ids,
            self.w13_bias,
            self.w2_bias if self.tp_rank == 0 else None,  # added once, before the all-reduce
            "clamped_swiglu",
            self.alpha,
            self.limit,
        )
        return all_reduce(out)
