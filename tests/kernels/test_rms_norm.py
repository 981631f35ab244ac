"""RMSNorm kernels (Triton; the interpreter without a GPU) against the float32-inside reference."""

from __future__ import annotations

import pytest
import torch

from atom.kernels.rms_norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)
from atom.layers.norm import RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Summation order inside rstd may move the rounding before the weight by 1 ulp, and so the
# rounding after it: 2 ulps relative, at most.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=2e-3)}
EPS = 1e-6


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("num_tokens", "hidden_size"), [(1, 64), (7, 769), (33, 64), (3, 4096)])
def test_rms_norm(num_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
    x = _randn(num_tokens, hidden_size, dtype=dtype, seed=hidden_size)
    w = _randn(hidden_size, dtype=dtype, seed=1)
    torch.testing.assert_close(rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("num_tokens", "hidden_size"), [(1, 64), (7, 769), (33, 64)])
def test_fused_add_rms_norm(num_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
    x = _randn(num_tokens, hidden_size, dtype=dtype, seed=hidden_size)
    residual = _randn(num_tokens, hidden_size, dtype=dtype, seed=2)
    w = _randn(hidden_size, dtype=dtype, seed=3)
    x0, r0 = x.clone(), residual.clone()
    out, new_residual = fused_add_rms_norm(x, residual, w, EPS)
    expected, expected_residual = fused_add_rms_norm_ref(x, residual, w, EPS)
    torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)
    torch.testing.assert_close(out, expected, **TOL[dtype])
    assert torch.equal(x, x0) and torch.equal(residual, r0)  # out of place


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_per_head_views(dtype: torch.dtype) -> None:
    """Qwen3's q_norm/k_norm: [T, heads, head_dim] views into the fused qkv output."""
    num_tokens, heads, kv_heads, head_dim = 7, 5, 1, 64
    qkv = _randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=4)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(num_tokens, 1, head_dim)
    w = _randn(head_dim, dtype=dtype, seed=5)
    for x in (q, k):
        out = rms_norm(x, w, EPS)
        assert out.shape == x.shape and out.is_contiguous()
        torch.testing.assert_close(out, rms_norm_ref(x, w, EPS), **TOL[dtype])


def test_rms_norm_float32_weight_promotes() -> None:
    """The reference multiplies in torch's promoted dtype: an fp32 weight gives an fp32 result."""
    x = _randn(7, 769, dtype=torch.float16, seed=6)
    w = _randn(769, dtype=torch.float32, seed=7)
    out = rms_norm(x, w, EPS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_ref(x, w, EPS), atol=1e-5, rtol=1e-5)


def test_layer_keeps_its_semantics() -> None:
    """RMSNorm (the ops path) returns (norm(x + residual), x + residual), or (norm(x), x)."""
    layer = RMSNorm(769, eps=1e-5).to(DEVICE)
    layer.weight.data = _randn(769, dtype=torch.float32, seed=8)
    x, residual = (
        _randn(7, 769, dtype=torch.float32, seed=9),
        _randn(7, 769, dtype=torch.float32, seed=10),
    )
    out, res = layer(x, residual)
    torch.testing.assert_close(res, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(
        out, rms_norm_ref(x + residual, layer.weight, 1e-5), **TOL[torch.float32]
    )
    out, res = layer(x)
    assert res is x
    torch.testing.assert_close(out, layer.norm(x), atol=0, rtol=0)
