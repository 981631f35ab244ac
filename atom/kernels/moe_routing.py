"""Top-k routing in one pass: a program per token reads its router logits once and writes its
top_k experts and their weights. Softmax then top-k, optionally renormalised (Qwen3-MoE, Mixtral,
DeepSeek-V2's greedy), or top-k of the raw logits then a softmax over those k (GPT-OSS).

In torch this is three launches or more (softmax, topk, sum and divide); in a decode step of a
48-layer MoE model each launch costs more than the work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from atom.kernels.grid import next_power_of_2


def softmax_topk_ref(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Softmax over all experts, keep the top_k; renormalize divides them by their sum
    (norm_topk_prob). Returns (weights [T, top_k] float32, expert ids [T, top_k] int64)."""
    probs = router_logits.softmax(dim=-1, dtype=torch.float32)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def topk_softmax_ref(router_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Top-k of the raw logits, then a softmax over just those k (GPT-OSS's router).
    Returns (weights [T, top_k] float32, expert ids [T, top_k] int64)."""
    values, ids = router_logits.topk(top_k, dim=-1)
    return values.float().softmax(dim=-1), ids


@triton.jit
def _routing_kernel(
    logits_ptr,  # [T, E], last dim contiguous
    weights_ptr,  # [T, TOP_K] float32 out
    ids_ptr,  # [T, TOP_K] int64 out
    num_experts,
    stride_row,
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    SOFTMAX_FIRST: tl.constexpr,  # softmax over all, then top-k; else top-k, then softmax
    RENORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    valid = cols < num_experts
    x = tl.load(logits_ptr + row * stride_row + cols, mask=valid, other=-float("inf"))
    x = x.to(tl.float32)
    if SOFTMAX_FIRST:
        p = tl.exp(x - tl.max(x, 0))
        p = p / tl.sum(p, 0)
    else:
        p = x
    slots = tl.arange(0, K_POW2)
    weights = tl.zeros([K_POW2], dtype=tl.float32)
    ids = tl.zeros([K_POW2], dtype=tl.int64)
    free = valid  # real experts not picked yet: NaN and -inf scores never pick a padding lane
    for k in tl.static_range(TOP_K):  # the best left, lowest expert id among equals
        best = tl.max(tl.where(free, p, -float("inf")), 0)
        first_best = tl.min(tl.where(free & (p == best), cols, BLOCK_E), 0)
        first_free = tl.min(tl.where(free, cols, BLOCK_E), 0)  # a NaN row: no score compares
        pick = tl.where(first_best < BLOCK_E, first_best, first_free)
        score = tl.sum(tl.where(cols == pick, p, 0.0), 0)
        weights = tl.where(slots == k, score, weights)
        ids = tl.where(slots == k, pick.to(tl.int64), ids)
        free = free & (cols != pick)
    if not SOFTMAX_FIRST:  # the softmax over the k logits picked
        weights = tl.where(slots < TOP_K, weights, -float("inf"))
        weights = tl.exp(weights - tl.max(weights, 0))
        weights = weights / tl.sum(weights, 0)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, 0)  # the padding slots hold 0
    out = row * TOP_K + slots
    tl.store(weights_ptr + out, weights, mask=slots < TOP_K)
    tl.store(ids_ptr + out, ids, mask=slots < TOP_K)


def softmax_topk(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """The contract of softmax_topk_ref (ties may pick another of the equal experts)."""
    return _route(router_logits, top_k, softmax_first=True, renormalize=renormalize)


def topk_softmax(router_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The contract of topk_softmax_ref (ties may pick another of the equal experts)."""
    return _route(router_logits, top_k, softmax_first=False, renormalize=False)


def _route(
    router_logits: Tensor, top_k: int, softmax_first: bool, renormalize: bool
) -> tuple[Tensor, Tensor]:
    num_tokens, num_experts = router_logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} not in [1, {num_experts}]")
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    block_e = next_power_of_2(num_experts)
    _routing_kernel[(num_tokens,)](
        logits,
        weights,
        ids,
        num_experts,
        logits.stride(0),
        TOP_K=top_k,
        K_POW2=next_power_of_2(top_k),
        SOFTMAX_FIRST=softmax_first,
        RENORMALIZE=renormalize,
        BLOCK_E=block_e,
        num_warps=4 if block_e <= 512 else 8,
    )
    return weights, ids
