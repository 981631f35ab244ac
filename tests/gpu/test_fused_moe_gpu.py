"""The fused MoE kernels on CUDA against the torch expert loop at Qwen3-30B-A3B-like shapes scaled
down; CUDA-graph capture and replay, which fails if anything syncs with the host."""

from __future__ import annotations

import functools

import pytest
import torch

from atom.kernels import ops
from atom.kernels.fused_moe import _tuned_table, fused_experts, moe_align
from atom.kernels.moe_routing import (
    softmax_topk,
    softmax_topk_ref,
    topk_softmax,
    topk_softmax_ref,
)
from atom.kernels.silu_and_mul import clamped_swiglu
from atom.layers.moe import compile_expert_kernels
from atom.layers.moe import fused_experts as fused_experts_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HIDDEN, INTER, EXPERTS, TOP_K = 512, 192, 64, 8  # Qwen3-30B-A3B: 2048, 768, 128, 8
# The kernel rounds gate_up, the activation and each weighted expert output to the dtype;
# the reference is float32 throughout on the same rounded inputs.
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}


def _inputs(num_tokens: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, generator=gen, device="cuda")
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen, device="cuda") / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen, device="cuda") / INTER**0.5
    # skewed routing: a few hot experts, some never chosen
    logits = torch.randn(num_tokens, EXPERTS, generator=gen, device="cuda")
    logits[:, : EXPERTS // 8] += 2.0
    logits[:, -4:] = -1e4
    weights, ids = logits.softmax(-1).topk(TOP_K, dim=-1)
    return x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_tokens", [1, 7, 32, 33, 300])
def test_matches_reference(num_tokens: int, dtype: torch.dtype) -> None:
    x, w13, w2, weights, ids = _inputs(num_tokens, dtype, seed=num_tokens)
    out = ops.fused_experts(x, w13, w2, weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    expected = fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


def test_no_sync_in_eager() -> None:
    x, w13, w2, weights, ids = _inputs(16, torch.bfloat16, seed=5)
    fused_experts(x, w13, w2, weights, ids)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe_align(ids, EXPERTS, 16)
        fused_experts(x, w13, w2, weights, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("num_tokens", [4, 64])
def test_cuda_graph_replay_matches_eager(num_tokens: int) -> None:
    x, w13, w2, weights, ids = _inputs(num_tokens, torch.bfloat16, seed=11)
    out = fused_experts(x, w13, w2, weights, ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, w13, w2, weights, ids)
    for seed in range(3):  # new hidden states and new routing in the same buffers
        new_x, _, _, new_weights, new_ids = _inputs(num_tokens, torch.bfloat16, seed=100 + seed)
        x.copy_(new_x)
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        replayed = out.clone()
        torch.testing.assert_close(
            replayed, fused_experts(x, w13, w2, weights, ids), atol=0, rtol=0
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_tokens", [1, 13, 200])
def test_gpt_oss_experts_match_reference(num_tokens: int, dtype: torch.dtype) -> None:
    """Biases in the GEMM epilogues and the clamped SwiGLU, through the op the layers call."""
    x, w13, w2, weights, ids = _inputs(num_tokens, dtype, seed=3 * num_tokens)
    gen = torch.Generator(device="cuda").manual_seed(9)
    b13 = torch.randn(EXPERTS, 2 * INTER, generator=gen, device="cuda").to(dtype)
    b2 = torch.randn(EXPERTS, HIDDEN, generator=gen, device="cuda").to(dtype)
    out = torch.ops.atom.fused_experts(
        x, w13, w2, weights, ids, b13, b2, "clamped_swiglu", 1.702, 7.0
    )
    gate = functools.partial(clamped_swiglu, alpha=1.702, limit=7.0)
    expected = fused_experts_ref(
        x.float(), w13.float(), w2.float(), weights, ids, b13.float(), b2.float(), gate
    )
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


@pytest.mark.parametrize("num_tokens", [1, 8, 300, 1024, 4096])  # every BLOCK_M of the table
def test_tuned_configs_match_reference(num_tokens: int) -> None:
    """Every tuned shape's tiles at its own sizes (bf16), against the float32 loop."""
    table = _tuned_table()
    if not table:
        pytest.skip("no tuned table")
    for key in table:
        shape = dict(item.split("=") for item in key.split(","))
        hidden, inter, experts, top_k = (int(shape[n]) for n in "HIEK")
        gen = torch.Generator(device="cuda").manual_seed(num_tokens)
        x = torch.randn(num_tokens, hidden, generator=gen, device="cuda").bfloat16()
        w13 = torch.randn(experts, 2 * inter, hidden, generator=gen, device="cuda") / hidden**0.5
        w2 = torch.randn(experts, hidden, inter, generator=gen, device="cuda") / inter**0.5
        logits = torch.randn(num_tokens, experts, generator=gen, device="cuda")
        weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
        out = fused_experts(x, w13.bfloat16(), w2.bfloat16(), weights, ids)
        expected = fused_experts_ref(
            x.float(), w13.bfloat16().float(), w2.bfloat16().float(), weights, ids
        )
        torch.testing.assert_close(out.float(), expected, **TOL[torch.bfloat16])


def test_compile_expert_kernels_runs_every_tile_config() -> None:
    """The start-up pass over the tile table (tuned Qwen3-30B-A3B shape, bf16) and the
    heuristic's two classes (GPT-OSS-style biased experts, float32) runs through."""
    w13 = torch.randn(128, 2 * 768, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(128, 2048, 768, device="cuda", dtype=torch.bfloat16) * 0.02
    compile_expert_kernels(w13, w2, 8, 16384)
    w13, w2 = torch.randn(4, 64, 32, device="cuda"), torch.randn(4, 32, 32, device="cuda")
    b13, b2 = torch.randn(4, 64, device="cuda"), torch.randn(4, 32, device="cuda")
    compile_expert_kernels(w13, w2, 2, 100, b13, b2, "clamped_swiglu", 1.702, 7.0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), [(1, 128, 8), (300, 8, 2)])
def test_softmax_topk_routing_matches_reference(
    num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    logits = (torch.randn(num_tokens, num_experts, generator=gen, device="cuda") * 3).to(dtype)
    weights, ids = softmax_topk(logits, top_k, True)
    ref_weights, ref_ids = softmax_topk_ref(logits, top_k, True)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    probs = logits.softmax(dim=-1, dtype=torch.float32)  # ties (bf16) may pick another equal
    torch.testing.assert_close(probs.gather(1, ids), probs.gather(1, ref_ids))
    weights, ids = topk_softmax(logits, top_k)  # GPT-OSS's order: top-k, then softmax
    ref_weights, ref_ids = topk_softmax_ref(logits, top_k)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    assert torch.equal(logits.gather(1, ids), logits.gather(1, ref_ids))
