"""Linear layers, shardable over the tensor-parallel group.

Each parameter carries a `weight_loader(param, loaded, shard_id=None) -> int` that copies its slice
of a checkpoint tensor and returns the number of elements written; the loader sums these to prove
that every parameter was filled exactly.

    column parallel: W [out, in] split on out   -> each rank computes out/tp features
    row parallel:    W [out, in] split on in    -> partial sums, all-reduced
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from atom.distributed import all_reduce, tp_rank, tp_world_size
from atom.kernels import linear_ops
from atom.layers.norm import NormedRows

if TYPE_CHECKING:
    from atom.layers.norm import RMSNorm


def _copy_checked(dst: Tensor, src: Tensor, what: str) -> int:
    if dst.shape != src.shape:
        raise ValueError(
            f"shape mismatch for {what}: parameter {tuple(dst.shape)}, "
            f"checkpoint {tuple(src.shape)}"
        )
    dst.copy_(src)
    return dst.numel()


def default_weight_loader(param: Tensor, loaded: Tensor, shard_id: object = None) -> int:
    return _copy_checked(param.data, loaded, "parameter")


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={d}")
    return n // d


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        # Set by the model where an RMSNorm follows this layer (forward_add_norm: the residual
        # add and the norm in its gemv epilogue) or precedes it (NormedRows in): which variants
        # the start-up precompile launches (executor/precompile.py).
        self.norm_after = False
        self.normed_input = False

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: object = None) -> int:
        return default_weight_loader(param, loaded)

    def forward(self, x: Tensor | NormedRows) -> Tensor:
        """x: rows, or an RMSNorm's (NormedRows: their deferred scale applied here)."""
        if isinstance(x, NormedRows):
            return linear_ops.linear(x.rows, self.weight, self.bias, x.sumsq, x.eps)
        return linear_ops.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        self.tp_size, self.tp_rank = tp_world_size(), tp_rank()
        super().__init__(in_features, _divide(out_features, self.tp_size, "out_features"), bias)

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: object = None) -> int:
        size = param.shape[0]
        return _copy_checked(param.data, loaded.narrow(0, self.tp_rank * size, size), "column")


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_up_proj); shard_id is the index."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias)

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: object = None) -> int:
        assert isinstance(shard_id, int), shard_id
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        dst = param.data.narrow(0, offset, size)
        return _copy_checked(dst, loaded.narrow(0, self.tp_rank * size, size), "merged shard")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul; KV heads are replicated when fewer than ranks."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool
    ) -> None:
        tp = tp_world_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = _divide(num_kv_heads, tp, "num_key_value_heads")
            self.kv_replicas = 1
        else:
            self.num_kv_heads = 1
            self.kv_replicas = _divide(tp, num_kv_heads, "tensor_parallel_size/num_kv_heads")
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias)

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: object = None) -> int:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank = 0, q_size, self.tp_rank
        elif shard_id in ("k", "v"):
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, rank = kv_size, self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"unknown qkv shard {shard_id!r}")
        dst = param.data.narrow(0, offset, size)
        return _copy_checked(dst, loaded.narrow(0, rank * size, size), f"{shard_id}_proj")


class RowParallelLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        self.tp_size, self.tp_rank = tp_world_size(), tp_rank()
        super().__init__(_divide(in_features, self.tp_size, "in_features"), out_features, bias)

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: object = None) -> int:
        if param.dim() == 1:  # the bias is added once, on rank 0's partial sum
            return _copy_checked(param.data, loaded, "row bias")
        size = param.shape[1]
        return _copy_checked(param.data, loaded.narrow(1, self.tp_rank * size, size), "row")

    # --mark-trace tags it too (executor/profiling.py): its tag holds the norm after the layer
    traced_methods = ("forward_add_norm",)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        return all_reduce(linear_ops.linear(x, self.weight, bias))

    def forward_add_norm(
        self, x: Tensor, residual: Tensor, norm: RMSNorm
    ) -> tuple[NormedRows, Tensor]:
        """(norm's rows of forward(x) + residual for the linear layer after the norm, the sum):
        at decode row counts the residual add and the norm in this layer's gemv epilogue, the
        norm's 1/rms left to the next layer's (kernels/gemv_norm.py); over several ranks the
        norm runs after the all-reduce."""
        if self.tp_size > 1:
            h, residual, sumsq = linear_ops.add_rms_norm_rows(
                self(x), residual, norm.weight, norm.eps
            )
        else:
            h, residual, sumsq = linear_ops.linear_add_rms_norm(
                x, self.weight, self.bias, residual, norm.weight, norm.eps
            )
        return NormedRows(h, sumsq, norm.eps), residual
