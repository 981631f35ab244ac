"""Softmax top-k routing (Triton; the interpreter without a GPU) against its torch reference."""

from __future__ import annotations

import pytest
import torch

from atom.kernels import ops
from atom.kernels.moe_routing import (
    softmax_topk,
    softmax_topk_ref,
    topk_softmax,
    topk_softmax_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k"), [(1, 4, 1), (37, 8, 2), (5, 60, 6), (9, 128, 8)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(
    num_tokens: int, num_experts: int, top_k: int, renormalize: bool, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(num_tokens * num_experts + top_k)
    logits = (torch.randn(num_tokens, num_experts, generator=gen) * 3).to(DEVICE, dtype)
    weights, ids = softmax_topk(logits, top_k, renormalize)
    ref_weights, ref_ids = softmax_topk_ref(logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert weights.shape == ids.shape == (num_tokens, top_k)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    # fp16 logits tie often: equal experts may come in another order (or, at the k-th place,
    # another of them), so compare what was picked by its probability
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    torch.testing.assert_close(probs.gather(1, ids), probs.gather(1, ref_ids))
    assert all(len(set(row)) == top_k for row in ids.tolist())  # distinct experts
    if dtype == torch.float32:
        assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k"), [(1, 4, 1), (33, 32, 4), (5, 60, 3)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_then_softmax_matches_reference(
    num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype
) -> None:
    """GPT-OSS: the top_k raw logits, then a softmax over them."""
    gen = torch.Generator().manual_seed(num_tokens + top_k)
    logits = (torch.randn(num_tokens, num_experts, generator=gen) * 3).to(DEVICE, dtype)
    weights, ids = topk_softmax(logits, top_k)
    ref_weights, ref_ids = topk_softmax_ref(logits, top_k)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    assert torch.equal(logits.gather(1, ids), logits.gather(1, ref_ids))  # ties: any equal one
    assert all(len(set(row)) == top_k for row in ids.tolist())
    if dtype == torch.float32:
        assert torch.equal(ids, ref_ids)


def test_ties_pick_distinct_experts_and_strided_rows() -> None:
    """Equal logits: distinct experts, lowest ids first; a row-strided view is read in place."""
    wide = torch.zeros(3, 16, device=DEVICE)
    wide[1, 5] = 2.0
    logits = wide[:, :8]  # row stride 16
    weights, ids = softmax_topk(logits, 3, renormalize=True)
    assert ids.tolist() == [[0, 1, 2], [5, 0, 1], [0, 1, 2]]
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, device=DEVICE))
    torch.testing.assert_close(weights[0], torch.full((3,), 1 / 3, device=DEVICE))
    assert softmax_topk(logits[:0], 2, True)[0].shape == (0, 2)
    with pytest.raises(ValueError, match="top_k"):
        softmax_topk(logits, 9, True)


def test_nan_and_infinite_logits_pick_real_distinct_experts() -> None:
    """A NaN row, or -inf logits, still name k distinct real experts (the alignment kernel
    indexes by them); the weights follow the reference (NaN where it is NaN)."""
    logits = torch.tensor(
        [[float("nan"), 1.0, 2.0, 0.5], [0.0, float("-inf"), float("-inf"), 1.0]], device=DEVICE
    )
    for _, ids in (softmax_topk(logits, 3, False), topk_softmax(logits, 3)):
        assert all(sorted(set(row)) == sorted(row) for row in ids.tolist())
        assert ids.min() >= 0 and ids.max() < 4
    weights, ids = topk_softmax(logits, 3)
    assert ids[1].tolist() == [3, 0, 1]  # the two finite logits, then the lowest -inf expert
    ref_weights, _ = topk_softmax_ref(logits, 3)
    torch.testing.assert_close(weights[1], ref_weights[1])
    assert torch.isnan(softmax_topk(logits, 3, False)[0][0]).all()  # as the reference's


def test_ops_dispatch_cpu_is_reference() -> None:
    if DEVICE == "cuda":
        pytest.skip("CPU dispatch only")
    logits = torch.randn(4, 8)
    got, want = ops.softmax_topk(logits, 2, True), softmax_topk_ref(logits, 2, True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    got, want = ops.topk_softmax(logits, 2), topk_softmax_ref(logits, 2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
