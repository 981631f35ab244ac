"""MoE routing and fused experts against hand-written per-token references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from atom.kernels.moe_routing import softmax_topk_ref as softmax_topk
from atom.layers import moe
from atom.layers.moe import (
    FusedMoE,
    MoERouting,
    fused_experts,
    grouped_topk,
    remap_expert_weights,
)

_QWEN = ("gate_proj", "up_proj", "down_proj")


def _softmax_topk_ref(logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    weights, ids = [], []
    for row in logits.double():
        probs = row.softmax(-1).tolist()
        chosen = sorted(range(len(probs)), key=lambda e: -probs[e])[:top_k]
        w = [probs[e] for e in chosen]
        total = sum(w) if renormalize else 1.0
        weights.append([x / total for x in w])
        ids.append(chosen)
    return torch.tensor(weights, dtype=torch.float32), torch.tensor(ids)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (128, 8), (4, 1)])
def test_softmax_topk(num_experts: int, top_k: int, renormalize: bool) -> None:
    logits = torch.randn(37, num_experts, generator=torch.Generator().manual_seed(0)) * 3
    weights, ids = softmax_topk(logits, top_k, renormalize)
    ref_weights, ref_ids = _softmax_topk_ref(logits, top_k, renormalize)
    assert weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(37))


def _deepseek_v3_route(
    logits: Tensor,
    bias: Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scale: float,
    scoring_func: str,
) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3's published Gate.forward (inference/model.py), one token at a time."""
    num_experts = logits.shape[1]
    group_size = num_experts // n_group
    all_weights, all_ids = [], []
    for row in logits.double():
        original = row.sigmoid() if scoring_func == "sigmoid" else row.softmax(-1)
        scores = (original if bias is None else original + bias.double()).tolist()
        group_scores = []
        for g in range(n_group):
            members = sorted(scores[g * group_size : (g + 1) * group_size], reverse=True)
            group_scores.append(members[0] if bias is None else members[0] + members[1])
        groups = sorted(range(n_group), key=lambda g: -group_scores[g])[:topk_group]
        candidates = [e for e in range(num_experts) if e // group_size in groups]
        chosen = sorted(candidates, key=lambda e: -scores[e])[:top_k]
        weights = [original[e].item() for e in chosen]
        total = sum(weights) if renormalize else 1.0
        all_weights.append([w / total * scale for w in weights])
        all_ids.append(chosen)
    return torch.tensor(all_weights, dtype=torch.float32), torch.tensor(all_ids)


@pytest.mark.parametrize(
    ("num_experts", "n_group", "topk_group", "top_k", "with_bias", "scoring_func", "renorm"),
    [
        (256, 8, 4, 8, True, "sigmoid", True),  # DeepSeek-V3 / GLM-4.5 shape
        (64, 8, 3, 6, True, "sigmoid", False),
        (16, 4, 1, 2, True, "sigmoid", True),  # every expert from one group
        (64, 8, 3, 6, False, "softmax", False),  # DeepSeek-V2: group max, softmax scores
    ],
)
def test_grouped_topk_matches_deepseek_v3(
    num_experts: int,
    n_group: int,
    topk_group: int,
    top_k: int,
    with_bias: bool,
    scoring_func: str,
    renorm: bool,
) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(29, num_experts, generator=gen) * 2
    # A bias as large as the scores, so that it really changes which experts are chosen.
    bias = torch.randn(num_experts, generator=gen) * 0.5 if with_bias else None
    args = (top_k, n_group, topk_group, renorm, 2.5)
    weights, ids = grouped_topk(logits, *args, bias, scoring_func)
    ref_weights, ref_ids = _deepseek_v3_route(logits, bias, *args, scoring_func)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)
    group_of = ids // (num_experts // n_group)
    assert all(len(set(row)) <= topk_group for row in group_of.tolist())
    if with_bias:  # the bias moved the choice away from plain top-k of the scores
        plain = grouped_topk(logits, *args, None, scoring_func)[1]
        assert not torch.equal(plain, ids)


def test_routing_config_is_validated() -> None:
    with pytest.raises(ValueError, match="scoring_func"):
        MoERouting(top_k=2, scoring_func="relu")
    with pytest.raises(ValueError, match="give both"):
        MoERouting(top_k=2, num_expert_group=4)
    with pytest.raises(ValueError, match="grouped"):
        MoERouting(top_k=2, scoring_func="sigmoid")
    with pytest.raises(ValueError, match="n_group"):
        FusedMoE(10, 8, 4, MoERouting(top_k=2, num_expert_group=4, topk_group=2))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        FusedMoE(4, 8, 4, MoERouting(top_k=5))


def _fused_experts_ref(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate_up = w13[e] @ x[t]
            out[t] += weights[t, k] * (w2[e] @ (F.silu(gate_up[:inter]) * gate_up[inter:]))
    return out


@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (16, 4), (4, 1)])
def test_fused_experts_matches_token_loop(num_tokens: int, num_experts: int, top_k: int) -> None:
    gen = torch.Generator().manual_seed(2)
    hidden, inter = 48, 40
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.2
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) * 0.2
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    weights, ids = softmax_topk(logits, top_k, renormalize=True)
    out = fused_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, _fused_experts_ref(x, w13, w2, weights, ids))


def test_fused_experts_bfloat16() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(33, 64, generator=gen)
    w13 = torch.randn(8, 64, 64, generator=gen) * 0.1
    w2 = torch.randn(8, 64, 32, generator=gen) * 0.1
    weights, ids = softmax_topk(torch.randn(33, 8, generator=gen), 2, renormalize=False)
    ref = _fused_experts_ref(x, w13, w2, weights, ids)
    out = fused_experts(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), weights, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def _expert_tensors(num_experts: int, hidden: int, inter: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(4)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen)  # transformers' layout
    down = torch.randn(num_experts, hidden, inter, generator=gen)
    return gate_up, down


def _load(layer: FusedMoE, items: list[tuple[str, Tensor, object]]) -> int:
    params = {"w13_weight": layer.w13_weight, "w2_weight": layer.w2_weight}
    return sum(layer.weight_loader(params[name], t, shard) for name, t, shard in items)


def _per_expert(gate_up: Tensor, down: Tensor) -> list[tuple[str, Tensor, object]]:
    inter = down.shape[2]
    items: list[tuple[str, Tensor, object]] = []
    for e in range(gate_up.shape[0]):
        items += [
            ("w13_weight", gate_up[e, :inter], (e, "w1")),
            ("w13_weight", gate_up[e, inter:], (e, "w3")),
            ("w2_weight", down[e], (e, "w2")),
        ]
    return items


def test_weight_loader_per_expert_and_stacked_agree() -> None:
    gate_up, down = _expert_tensors(4, 16, 8)
    stacked = FusedMoE(4, 16, 8, MoERouting(top_k=2))
    per_expert = FusedMoE(4, 16, 8, MoERouting(top_k=2))
    total = 4 * 3 * 16 * 8
    assert _load(stacked, [("w13_weight", gate_up, None), ("w2_weight", down, None)]) == total
    assert _load(per_expert, _per_expert(gate_up, down)) == total
    assert torch.equal(stacked.w13_weight, gate_up)
    assert torch.equal(stacked.w2_weight, down)
    assert torch.equal(per_expert.w13_weight, gate_up)
    assert torch.equal(per_expert.w2_weight, down)


def test_weight_loader_rejects_bad_tensors() -> None:
    layer = FusedMoE(4, 16, 8, MoERouting(top_k=2))
    with pytest.raises(ValueError, match="expert rows"):
        layer.weight_loader(layer.w13_weight, torch.zeros(9, 16), (0, "w1"))
    with pytest.raises(ValueError, match="expert columns"):
        layer.weight_loader(layer.w2_weight, torch.zeros(4, 16, 6))
    with pytest.raises(ValueError, match="out of range"):
        layer.weight_loader(layer.w2_weight, torch.zeros(16, 8), (4, "w2"))
    with pytest.raises(ValueError, match="shape mismatch"):
        layer.weight_loader(layer.w13_weight, torch.zeros(3, 16, 16))


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per-expert"])
def test_tensor_parallel_shards_sum_to_the_full_layer(
    monkeypatch: pytest.MonkeyPatch, stacked: bool
) -> None:
    num_experts, hidden, inter, tp = 8, 32, 24, 2
    gate_up, down = _expert_tensors(num_experts, hidden, inter)
    items = (
        [("w13_weight", gate_up, None), ("w2_weight", down, None)]
        if stacked
        else _per_expert(gate_up, down)
    )
    routing = MoERouting(top_k=2)
    full = FusedMoE(num_experts, hidden, inter, routing)
    _load(full, items)
    x = torch.randn(11, hidden, generator=torch.Generator().manual_seed(5))
    logits = torch.randn(11, num_experts, generator=torch.Generator().manual_seed(6))
    partial_sum = torch.zeros(11, hidden)
    monkeypatch.setattr(moe, "tp_world_size", lambda: tp)
    for rank in range(tp):
        monkeypatch.setattr(moe, "tp_rank", lambda rank=rank: rank)
        shard = FusedMoE(num_experts, hidden, inter, routing)
        assert shard.w2_weight.shape == (num_experts, hidden, inter // tp)
        # Each rank writes exactly its own slice: tp ranks together write every element once.
        assert _load(shard, items) == shard.w13_weight.numel() + shard.w2_weight.numel()
        partial_sum += shard(x, logits)  # no process group: all_reduce is the identity
    torch.testing.assert_close(partial_sum, full(x, logits))


def test_remap_expert_weights_names() -> None:
    t = torch.zeros(1)
    names = [
        "model.layers.3.mlp.experts.17.gate_proj.weight",
        "model.layers.3.mlp.experts.17.up_proj.weight",
        "model.layers.3.mlp.experts.17.down_proj.weight",
        "model.layers.3.mlp.experts.gate_up_proj",
        "model.layers.3.mlp.experts.down_proj",
        "model.layers.3.mlp.gate.weight",
        "model.layers.0.mlp.gate_proj.weight",  # a dense layer: left to packed_modules
    ]
    out = [(n, s) for n, _, s in remap_expert_weights(((n, t) for n in names), *_QWEN)]
    assert out == [
        ("model.layers.3.mlp.experts.w13_weight", (17, "w1")),
        ("model.layers.3.mlp.experts.w13_weight", (17, "w3")),
        ("model.layers.3.mlp.experts.w2_weight", (17, "w2")),
        ("model.layers.3.mlp.experts.w13_weight", None),
        ("model.layers.3.mlp.experts.w2_weight", None),
        ("model.layers.3.mlp.gate.weight", None),
        ("model.layers.0.mlp.gate_proj.weight", None),
    ]
    mixtral = remap_expert_weights(
        [("model.layers.0.block_sparse_moe.experts.7.w3.weight", t)], gate="w1", up="w3", down="w2"
    )
    assert [(n, s) for n, _, s in mixtral] == [
        ("model.layers.0.block_sparse_moe.experts.w13_weight", (7, "w3"))
    ]


def test_layer_compiles_whole_around_the_experts_op() -> None:
    """Dynamo traces a FusedMoE layer in one graph (fullgraph, dynamic token count): the experts
    are one opaque op, so the CPU loop's host counts stay out of the trace."""
    torch.manual_seed(0)
    layer = FusedMoE(8, 16, 12, MoERouting(top_k=2))
    torch.nn.init.normal_(layer.w13_weight, std=0.3)
    torch.nn.init.normal_(layer.w2_weight, std=0.3)
    compiled = torch.compile(layer, backend="eager", fullgraph=True, dynamic=True)
    for num_tokens in (3, 7):
        x, logits = torch.randn(num_tokens, 16), torch.randn(num_tokens, 8)
        torch.testing.assert_close(compiled(x, logits), layer(x, logits))


@pytest.mark.parametrize(("n_group", "renorm", "scale"), [(1, False, 1.0), (4, True, 2.5)])
def test_select_experts_softmax_with_every_group_kept_is_plain_topk(
    n_group: int, renorm: bool, scale: float
) -> None:
    """DeepSeek-V2's "greedy" (one group) or topk_group == n_group keeps every expert in play:
    select_experts takes the one-pass softmax top-k, equal to grouped_topk's answer."""
    logits = torch.randn(21, 16, generator=torch.Generator().manual_seed(3)) * 2
    routing = MoERouting(
        top_k=3,
        renormalize=renorm,
        num_expert_group=n_group,
        topk_group=n_group,
        routed_scaling_factor=scale,
    )
    ref_weights, ref_ids = grouped_topk(logits, 3, n_group, n_group, renorm, scale, None, "softmax")
    with pytest.MonkeyPatch.context() as mp:  # the shortcut, not grouped_topk, answers
        mp.setattr(moe, "grouped_topk", None)
        weights, ids = moe.select_experts(logits, routing)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)


@pytest.mark.parametrize(
    "routing",
    [
        MoERouting(top_k=2, num_expert_group=4, topk_group=2),  # groups dropped
        MoERouting(top_k=2, num_expert_group=4, topk_group=4, scoring_func="sigmoid"),
    ],
)
def test_select_experts_grouped_cases_keep_grouped_topk(routing: MoERouting) -> None:
    calls = []

    def spy(*args: object) -> tuple[Tensor, Tensor]:
        calls.append(args)
        return grouped_topk(*args)

    logits = torch.randn(5, 16, generator=torch.Generator().manual_seed(4))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moe, "grouped_topk", spy)
        moe.select_experts(logits, routing)
        moe.select_experts(logits, routing, torch.zeros(16))
    assert len(calls) == 2  # and with a correction bias too


def test_model_expert_kernels_compile_once_per_distinct_layer() -> None:
    from atom.layers.moe import compile_model_expert_kernels

    calls: list[tuple[int, int]] = []

    class Experts(torch.nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(n, 2))

        def compile_kernels(self, max_tokens: int) -> None:
            calls.append((self.w.shape[0], max_tokens))

    model = torch.nn.Sequential(Experts(4), torch.nn.Linear(2, 2), Experts(4), Experts(8))
    assert compile_model_expert_kernels(model, 64) == 2
    assert calls == [(4, 64), (8, 64)]
