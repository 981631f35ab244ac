"""Fused MoE (Triton; the interpreter without a GPU) against the torch expert loop."""

from __future__ import annotations

import functools
import inspect
import io
import re
import tokenize

import pytest
import torch

from atom.kernels import fused_moe, ops
from atom.kernels.fused_moe import fused_experts, moe_align
from atom.kernels.silu_and_mul import clamped_swiglu
from atom.layers.moe import fused_experts as fused_experts_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2)}


def _inputs(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """Random weights and routing over the first num_experts - 1 experts: the last gets none."""
    gen = torch.Generator().manual_seed(num_tokens * 1000 + num_experts * 10 + top_k)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    logits = torch.randn(num_tokens, num_experts - 1, generator=gen)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    cast = dict(device=DEVICE, dtype=dtype)
    return x.to(**cast), w13.to(**cast), w2.to(**cast), weights.to(DEVICE), ids.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k", "hidden", "inter"),
    [(1, 4, 1, 32, 32), (3, 8, 2, 64, 48), (17, 4, 2, 32, 48), (17, 8, 1, 64, 32)],
)
def test_fused_experts(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype
) -> None:
    x, w13, w2, weights, ids = _inputs(num_tokens, num_experts, top_k, hidden, inter, dtype)
    out = fused_experts(x, w13, w2, weights, ids)
    assert out.shape == x.shape and out.dtype == dtype
    expected = fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


def test_large_batch_tiles_and_strided_hidden() -> None:
    """T > 32 takes the BLOCK_M 64 tiles; a row-strided hidden is read in place."""
    x, w13, w2, weights, ids = _inputs(40, 4, 2, 32, 32, torch.float32)
    wide = torch.cat([x, x], dim=1)[:, :32]  # row stride 64
    out = fused_experts(wide, w13, w2, weights, ids)
    torch.testing.assert_close(out, fused_experts_ref(x, w13, w2, weights, ids), **TOL[x.dtype])
    assert fused_experts(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_biases_and_clamped_swiglu(dtype: torch.dtype) -> None:
    """GPT-OSS experts: biases in both GEMMs' epilogues, the clamped SwiGLU between them."""
    x, w13, w2, weights, ids = _inputs(9, 8, 3, 32, 48, dtype)
    gen = torch.Generator().manual_seed(7)
    b13 = torch.randn(8, 96, generator=gen).to(x)
    b2 = torch.randn(8, 32, generator=gen).to(x)
    gate = functools.partial(clamped_swiglu, alpha=1.702, limit=0.5)
    out = fused_experts(  # the Triton kernels (the interpreter without a GPU)
        x, w13, w2, weights, ids, b13, b2, lambda gu: gate(gu[:, :48], gu[:, 48:])
    )
    expected = fused_experts_ref(
        x.float(), w13.float(), w2.float(), weights, ids, b13.float(), b2.float(), gate
    )
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


def test_strided_routing_inputs() -> None:
    """Column slices of wider routing tensors (strided views) read as their values."""
    x, w13, w2, weights, ids = _inputs(6, 4, 2, 32, 32, torch.float32)
    out = fused_experts(x, w13, w2, weights[:, :1], ids[:, :1])
    expected = fused_experts_ref(x, w13, w2, weights[:, :1].contiguous(), ids[:, :1].contiguous())
    torch.testing.assert_close(out, expected, **TOL[x.dtype])


def test_custom_op_matches_reference() -> None:
    """torch.ops.atom.fused_experts: the op the layers call, either gate."""
    x, w13, w2, weights, ids = _inputs(5, 4, 2, 32, 32, torch.float32)
    b13, b2 = torch.randn(4, 64).to(x), torch.randn(4, 32).to(x)
    torch.testing.assert_close(
        torch.ops.atom.fused_experts(x, w13, w2, weights, ids),
        fused_experts_ref(x, w13, w2, weights, ids),
        **TOL[x.dtype],
    )
    gate = functools.partial(clamped_swiglu, alpha=2.0, limit=1.0)
    torch.testing.assert_close(
        torch.ops.atom.fused_experts(x, w13, w2, weights, ids, b13, b2, "clamped_swiglu", 2.0, 1.0),
        fused_experts_ref(x, w13, w2, weights, ids, b13, b2, gate),
        **TOL[x.dtype],
    )
    with pytest.raises(ValueError, match="activation"):
        torch.ops.atom.fused_experts(x, w13, w2, weights, ids, None, None, "gelu", 1.0, 1.0)


def test_select_config_uses_the_tuned_table() -> None:
    """Tuned tiles for a known shape in 16-bit (nearest token count); the heuristic otherwise."""
    table = fused_moe._tuned_table()
    if not table:
        pytest.skip("no tuned table")
    key, by_tokens = next(iter(table.items()))
    shape = dict(item.split("=") for item in key.split(","))
    e, i, h, k = (int(shape[n]) for n in "EIHK")
    t = max(by_tokens)
    assert fused_moe.select_config(t, e, i, h, k, torch.bfloat16) == by_tokens[t]
    assert fused_moe.select_config(t, e, i, h, k, torch.float32) == fused_moe.heuristic_config(t)
    assert fused_moe.select_config(3, 7, 5, 3, 1, torch.bfloat16) == fused_moe.heuristic_config(3)


def _check_align(ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    num_slots = ids.numel()
    slots, block_experts, total = moe_align(ids, num_experts, block_m)
    max_padded = -(-(num_slots + num_experts * (block_m - 1)) // block_m) * block_m
    assert slots.shape == (max_padded,) and slots.dtype == torch.int32
    assert block_experts.shape == (max_padded // block_m,)
    counts = torch.bincount(ids.flatten().cpu(), minlength=num_experts).tolist()
    padded = [-(-c // block_m) * block_m for c in counts]
    assert total.tolist() == [sum(padded)]
    flat = ids.flatten().cpu().tolist()
    slots, block_experts = slots.cpu().tolist(), block_experts.cpu().tolist()
    start = 0
    for expert, (count, size) in enumerate(zip(counts, padded, strict=True)):
        # each expert: its slots (in any order: atomics), then padding, whole blocks of it
        segment = slots[start : start + count]
        assert sorted(segment) == [s for s in range(num_slots) if flat[s] == expert]
        assert slots[start + count : start + size] == [num_slots] * (size - count)
        assert block_experts[start // block_m : (start + size) // block_m] == [expert] * (
            size // block_m
        )
        start += size
    assert slots[start:] == [num_slots] * (max_padded - start)
    assert block_experts[start // block_m :] == [-1] * (len(block_experts) - start // block_m)


def test_tile_token_counts_name_each_config_once() -> None:
    """One token count per distinct tile configuration: what the runner compiles at start-up."""
    assert fused_moe.tile_token_counts(7, 5, 3, 1, torch.bfloat16) == [1, 64]  # the heuristic
    for key, by_tokens in fused_moe._tuned_table().items():
        shape = dict(item.split("=") for item in key.split(","))
        e, i, h, k = (int(shape[n]) for n in "EIHK")
        counts = fused_moe.tile_token_counts(e, i, h, k, torch.bfloat16)
        configs = [fused_moe.select_config(t, e, i, h, k, torch.bfloat16) for t in counts]
        assert all(c not in configs[:j] for j, c in enumerate(configs))  # distinct
        assert all(cfg in configs for cfg in by_tokens.values())  # every one of the table's
        assert fused_moe.tile_token_counts(e, i, h, k, torch.float32) == [1, 64]


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_moe_align(block_m: int) -> None:
    ids = torch.tensor([[3, 0], [3, 5], [0, 3], [5, 1], [3, 0]], device=DEVICE)  # 2, 4: none
    _check_align(ids, 6, block_m)


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k", "block_m"), [
    (1, 128, 8, 16),  # decode: 8 slots, 121 blocks
    (700, 7, 2, 16),  # 1,400 slots: more than one chunk of 1,024
    (300, 64, 6, 64),  # E + 1 = 65: 128 bins
])  # fmt: skip
def test_moe_align_sizes(num_tokens: int, num_experts: int, top_k: int, block_m: int) -> None:
    gen = torch.Generator().manual_seed(num_tokens)
    ids = torch.rand(num_tokens, num_experts, generator=gen).topk(top_k, dim=-1).indices
    _check_align(ids.to(DEVICE), num_experts, block_m)


def test_cuda_path_has_no_host_sync() -> None:
    """Nothing in the kernel module reads a device value on the host (CUDA graphs need that)."""
    tokens = tokenize.generate_tokens(io.StringIO(inspect.getsource(fused_moe)).readline)
    source = "".join(t.string for t in tokens if t.type in (tokenize.NAME, tokenize.OP))  # code
    for pattern in (r"\.item\(", r"\.tolist\(", r"\.cpu\(", r"bincount", r"nonzero", r"\.numpy\("):
        assert not re.search(pattern, source), pattern
    # masks that select rows have a data-dependent size: a sync
    assert not re.search(r"\[[^\]]*(==|!=|<|>)[^\]]*\]", source)


def test_ops_dispatch_cpu_is_reference() -> None:
    x, w13, w2, weights, ids = _inputs(3, 4, 2, 32, 32, torch.float32)
    if x.is_cuda:
        pytest.skip("CPU dispatch only")
    torch.testing.assert_close(
        ops.fused_experts(x, w13, w2, weights, ids), fused_experts_ref(x, w13, w2, weights, ids)
    )
