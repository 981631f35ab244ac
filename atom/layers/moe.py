"""Mixture of experts: routing, and a fused-experts layer that tensor parallelism can shard.

All experts of a layer live in two stacked parameters, the layout a grouped-GEMM kernel wants:

    w13_weight [E, 2 * I/tp, H]   rows [0, I/tp) gate (w1), rows [I/tp, 2 * I/tp) up (w3)
    w2_weight  [E, H, I/tp]       down

Tensor parallelism splits every expert's intermediate dimension, as RowParallelLinear splits a dense
MLP: each rank computes a partial sum over its I/tp slice and the layer all-reduces the output.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atom.distributed import all_reduce, tp_rank, tp_world_size
from atom.kernels import ops
from atom.kernels.silu_and_mul import clamped_swiglu
from atom.layers.linear import _copy_checked

# Per-expert checkpoint keys ("...experts.7.gate_proj.weight", Mixtral "...experts.7.w1.weight")
# and the stacked keys transformers 5 keeps in memory ("...experts.gate_up_proj" [E, 2I, H]).
_PER_EXPERT_KEY = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
_STACKED_KEY = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)$")
_STACKED_PARAMS = {"gate_up_proj": "w13_weight", "down_proj": "w2_weight"}


@dataclass(frozen=True, slots=True)
class MoERouting:
    """How router logits [T, E] pick each token's top_k experts and their weights."""

    top_k: int
    renormalize: bool = True  # divide the top-k weights by their sum (norm_topk_prob)
    scoring_func: str = "softmax"  # "softmax" | "sigmoid"
    num_expert_group: int | None = None  # set: grouped top-k (DeepSeek-V3, GLM-4-MoE)
    topk_group: int | None = None  # groups each token may pick experts from
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"num_experts_per_tok must be >= 1, got {self.top_k}")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"unsupported scoring_func {self.scoring_func!r}")
        if (self.num_expert_group is None) != (self.topk_group is None):
            raise ValueError(
                f"n_group={self.num_expert_group} and topk_group={self.topk_group}: give both"
            )
        if self.num_expert_group is None and self.scoring_func != "softmax":
            raise ValueError(f"scoring_func {self.scoring_func!r} needs grouped routing")
        if self.num_expert_group is not None and not 0 < self.topk_group <= self.num_expert_group:
            raise ValueError(f"topk_group={self.topk_group} not in [1, n_group]")


def grouped_topk(
    router_logits: Tensor,
    top_k: int,
    num_expert_group: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling_factor: float = 1.0,
    e_score_correction_bias: Tensor | None = None,
    scoring_func: str = "sigmoid",
) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3 routing: experts come from the topk_group best of num_expert_group groups.

    A group scores the sum of its two best biased scores (its best score without a bias). The bias
    [E] only steers the choice, for load balance; weights are the unbiased scores.
    Returns (weights [T, top_k] float32, expert ids [T, top_k] int64).
    """
    num_tokens, num_experts = router_logits.shape
    logits = router_logits.float()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if e_score_correction_bias is None else scores + e_score_correction_bias
    grouped = choice.view(num_tokens, num_expert_group, num_experts // num_expert_group)
    if e_score_correction_bias is None:
        group_scores = grouped.amax(dim=-1)
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best_groups = group_scores.topk(topk_group, dim=-1).indices  # [T, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * routed_scaling_factor, ids


def select_experts(
    router_logits: Tensor, routing: MoERouting, e_score_correction_bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    if routing.num_expert_group is None and e_score_correction_bias is not None:
        raise ValueError("e_score_correction_bias needs grouped routing")
    if (
        routing.scoring_func == "softmax"
        and e_score_correction_bias is None
        and routing.topk_group == routing.num_expert_group  # None, or every group kept
    ):
        # Plain softmax top-k (DeepSeek-V2's "greedy" is grouped routing with one group): the
        # one-pass kernel on CUDA instead of grouped_topk's dozen ops.
        weights, ids = ops.softmax_topk(router_logits, routing.top_k, routing.renormalize)
        if routing.routed_scaling_factor != 1.0:
            weights = weights * routing.routed_scaling_factor
        return weights, ids
    assert routing.num_expert_group is not None and routing.topk_group is not None
    return grouped_topk(
        router_logits,
        routing.top_k,
        routing.num_expert_group,
        routing.topk_group,
        routing.renormalize,
        routing.routed_scaling_factor,
        e_score_correction_bias,
        routing.scoring_func,
    )


def silu_and_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def fused_experts(
    hidden_states: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13_bias: Tensor | None = None,
    w2_bias: Tensor | None = None,
    activation: Callable[[Tensor, Tensor], Tensor] = silu_and_mul,
) -> Tensor:
    """sum_k topk_weights[t, k] * down_e(act(gate_e(x_t), up_e(x_t))) with e = topk_ids[t, k].

    hidden_states [T, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], topk_* [T, K],
    optional biases [E, 2I] / [E, H] (GPT-OSS) -> [T, H]. The torch reference: it loops over the
    experts that received tokens. It is the CPU path and the oracle for the grouped-GEMM kernel
    that takes its place on CUDA through atom.kernels.ops.
    """
    num_experts, inter = w13.shape[0], w2.shape[2]
    out = torch.zeros_like(hidden_states)
    flat_ids = topk_ids.flatten()
    # (token, k) slots grouped by expert; one host sync for the counts, fine on the CPU path.
    order = flat_ids.argsort(stable=True)
    slot_tokens = order // topk_ids.shape[1]
    slot_weights = topk_weights.flatten()[order]
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        tokens = slot_tokens[start : start + count]
        x = hidden_states.index_select(0, tokens)
        gate_up = F.linear(x, w13[e], None if w13_bias is None else w13_bias[e])  # [n, 2I]
        act = activation(gate_up[:, :inter], gate_up[:, inter:])
        y = F.linear(act, w2[e], None if w2_bias is None else w2_bias[e])  # [n, H]
        out.index_add_(0, tokens, (y * slot_weights[start : start + count, None]).to(out.dtype))
        start += count
    return out


EXPERT_ACTIVATIONS = ("silu", "clamped_swiglu")


def routed_experts(
    hidden_states: Tensor,
    w13: Tensor,
    w2: Tensor,
    topk_weights: Tensor,
    topk_ids: Tensor,
    w13_bias: Tensor | None = None,
    w2_bias: Tensor | None = None,
    activation: str = "silu",
    alpha: float = 1.0,
    limit: float = 0.0,
) -> Tensor:
    """The routed experts of a layer: hidden [T, H] -> [T, H]. activation: "silu"
    (SiLU-and-mul) or "clamped_swiglu" (GPT-OSS, with alpha and limit). CUDA: the sync-free
    grouped-GEMM kernels; elsewhere the expert loop above.

    Under torch.compile this is one opaque op (torch.ops.atom.fused_experts): Dynamo and
    Inductor see a [T, H] output, not the kernels, their launch configs or the CPU loop's counts.
    Eagerly it runs without the dispatcher (~10 us a call, as attention)."""
    if torch.compiler.is_compiling():
        return torch.ops.atom.fused_experts(
            hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias, activation,
            alpha, limit,
        )  # fmt: skip
    if activation not in EXPERT_ACTIVATIONS:
        raise ValueError(f"unknown expert activation {activation!r}")
    gate = None  # SiLU-and-mul
    if activation == "clamped_swiglu":
        gate = functools.partial(clamped_swiglu, alpha=alpha, limit=limit)
    args = (hidden_states, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias)
    return ops.fused_experts(*args, gate)


fused_experts_op = torch.library.custom_op("atom::fused_experts", routed_experts, mutates_args=())


@fused_experts_op.register_fake
def _(hidden_states: Tensor, *args: object, **kwargs: object) -> Tensor:  # as routed_experts
    return torch.empty_like(hidden_states)


def compile_model_expert_kernels(model: nn.Module, max_tokens: int) -> int:
    """Every MoE layer's kernels compiled once per distinct layer (type and weight shapes) by its
    compile_kernels; returns how many distinct layers were compiled."""
    done = set()
    for module in model.modules():
        compile_kernels = getattr(module, "compile_kernels", None)
        if compile_kernels is None:
            continue
        key = (type(module), *(tuple(p.shape) for p in module.parameters()))
        if key not in done:
            done.add(key)
            compile_kernels(max_tokens)
    return len(done)


def compile_expert_kernels(
    w13: Tensor,
    w2: Tensor,
    top_k: int,
    max_tokens: int,
    w13_bias: Tensor | None = None,
    w2_bias: Tensor | None = None,
    activation: str = "silu",
    alpha: float = 1.0,
    limit: float = 0.0,
) -> None:
    """Runs these experts on zeros once per tile configuration of their shape (CUDA only): Triton
    compiles a configuration on its first launch (about a second), which a request arriving with
    a new prompt length would otherwise wait for mid-serving."""
    if not w13.is_cuda:
        return
    from atom.kernels.fused_moe import tile_token_counts  # Triton: CUDA only

    num_experts, hidden = w13.shape[0], w13.shape[2]
    capability = torch.cuda.get_device_capability(w13.device)
    for count in tile_token_counts(num_experts, w2.shape[2], hidden, top_k, w13.dtype, capability):
        num_tokens = min(count, max_tokens)
        ids = torch.arange(num_tokens * top_k, device=w13.device).remainder(num_experts)
        weights = torch.full((num_tokens, top_k), 1 / top_k, device=w13.device)
        x = w13.new_zeros(num_tokens, hidden)
        args = (w13_bias, w2_bias, activation, alpha, limit)
        routed_experts(x, w13, w2, weights, ids.view(num_tokens, top_k), *args)


def _check_routing(routing: MoERouting, num_experts: int) -> None:
    if routing.top_k > num_experts:
        raise ValueError(f"num_experts_per_tok={routing.top_k} > num_experts={num_experts}")
    groups = routing.num_expert_group
    if groups is None:
        return
    assert routing.topk_group is not None
    if num_experts % groups or num_experts // groups < 2:
        raise ValueError(f"n_group={groups} must split {num_experts} experts in groups of >= 2")
    if routing.top_k > routing.topk_group * (num_experts // groups):
        raise ValueError(f"num_experts_per_tok={routing.top_k} > experts in topk_group groups")


class FusedMoE(nn.Module):
    """The routed experts of one layer: router logits in, the weighted sum of expert MLPs out."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        routing: MoERouting,
        hidden_act: str = "silu",
    ) -> None:
        super().__init__()
        if hidden_act not in ("silu", "swiglu"):
            raise ValueError(f"unsupported expert hidden_act {hidden_act!r}")
        _check_routing(routing, num_experts)
        self.tp_size, self.tp_rank = tp_world_size(), tp_rank()
        if intermediate_size % self.tp_size:
            raise ValueError(
                f"moe_intermediate_size={intermediate_size} is not divisible by "
                f"tensor_parallel_size={self.tp_size}"
            )
        self.num_experts, self.routing = num_experts, routing
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.shard_size = intermediate_size // self.tp_size
        self.w13_weight = nn.Parameter(
            torch.empty(num_experts, 2 * self.shard_size, hidden_size), requires_grad=False
        )
        self.w2_weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, self.shard_size), requires_grad=False
        )
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: object = None) -> int:
        """shard_id None: all experts stacked as transformers keeps them (gate_up_proj [E, 2I, H],
        down_proj [E, H, I]); (expert, "w1" | "w3" | "w2"): one expert's gate / up [I, H] or
        down [H, I]."""
        if shard_id is None:
            if param is self.w13_weight:
                gate, up = loaded.chunk(2, dim=-2)
                return self._load_w13(param.data, gate, 0) + self._load_w13(param.data, up, 1)
            return self._load_w2(param.data, loaded)
        assert isinstance(shard_id, tuple), shard_id
        expert, which = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range for {self.num_experts} experts")
        if which == "w2":
            return self._load_w2(param.data[expert], loaded)
        if which not in ("w1", "w3"):
            raise ValueError(f"unknown expert shard {which!r}")
        return self._load_w13(param.data[expert], loaded, 0 if which == "w1" else 1)

    def _load_w13(self, dst: Tensor, src: Tensor, half: int) -> int:
        # dst [..., 2 * I/tp, H], src [..., I, H]: this rank's rows of the gate (0) or up (1) half
        if src.shape[-2] != self.intermediate_size:
            raise ValueError(f"{src.shape[-2]} expert rows, expected {self.intermediate_size}")
        size = self.shard_size
        src = src.narrow(-2, self.tp_rank * size, size)
        return _copy_checked(dst.narrow(-2, half * size, size), src, "w13")

    def _load_w2(self, dst: Tensor, src: Tensor) -> int:
        # dst [..., H, I/tp], src [..., H, I]: this rank's columns
        if src.shape[-1] != self.intermediate_size:
            raise ValueError(f"{src.shape[-1]} expert columns, expected {self.intermediate_size}")
        src = src.narrow(-1, self.tp_rank * self.shard_size, self.shard_size)
        return _copy_checked(dst, src, "w2")

    def compile_kernels(self, max_tokens: int) -> None:
        compile_expert_kernels(self.w13_weight, self.w2_weight, self.routing.top_k, max_tokens)

    def forward(
        self,
        hidden_states: Tensor,
        router_logits: Tensor,
        e_score_correction_bias: Tensor | None = None,
    ) -> Tensor:
        # hidden_states [T, H], router_logits [T, E]
        topk_weights, topk_ids = select_experts(
            router_logits, self.routing, e_score_correction_bias
        )
        out = routed_experts(hidden_states, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        return all_reduce(out)


def remap_expert_weights(
    weights: Iterable[tuple[str, Tensor]], gate: str, up: str, down: str
) -> Iterator[tuple[str, Tensor, object]]:
    """Checkpoint expert tensors onto FusedMoE parameters, as (name, tensor, shard_id).

    Per-expert keys "<p>.experts.<e>.<gate|up|down>.weight" get (e, "w1" | "w3" | "w2"); stacked
    keys "<p>.experts.gate_up_proj" / "<p>.experts.down_proj" get None. Other tensors pass with
    shard_id None, so the loader's packed_modules table still applies to them.
    """
    shards = {gate: ("w13_weight", "w1"), up: ("w13_weight", "w3"), down: ("w2_weight", "w2")}
    for name, tensor in weights:
        if (m := _PER_EXPERT_KEY.match(name)) and m["proj"] in shards:
            param, which = shards[m["proj"]]
            yield f"{m['prefix']}.{param}", tensor, (int(m["expert"]), which)
        elif m := _STACKED_KEY.match(name):
            yield f"{m['prefix']}.{_STACKED_PARAMS[m['proj']]}", tensor, None
        else:
            yield name, tensor, None
