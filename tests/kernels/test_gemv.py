"""gemv and its fused prologues (Triton; the interpreter without a GPU) against float32 torch:
odd sizes, strided rows, the residual written once."""

from __future__ import annotations

import pytest
import torch

from atom.kernels.gemv import (
    MAX_M,
    GemvConfig,
    gemv,
    gemv_ref,
    rms_norm_gemv,
    rms_norm_gemv_ref,
    silu_mul_gemv,
    silu_mul_gemv_ref,
)
from atom.kernels.rms_norm import fused_add_rms_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
}
# The interpreter mishandles bfloat16: that case runs on a GPU only.
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE == "cpu", reason="GPU only")),
]
SMALL = GemvConfig(block_n=16, block_k=64, num_warps=4, num_stages=2)  # several tiles of each


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


SHAPES = [(1, 67, 300), (3, 128, 64), (MAX_M, 40, 129)]  # (M, N, K)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_gemv(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    x = _randn(m, k + 5, dtype=dtype, seed=k)[:, 5:]  # rows strided, not contiguous
    w = _randn(n, k, dtype=dtype, seed=n, scale=k**-0.5)
    out = gemv(x, w, SMALL)
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(out.float(), gemv_ref(x, w), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_gemv(m: int, n: int, k: int, dtype: torch.dtype, with_residual: bool) -> None:
    x = _randn(m, k, dtype=dtype, seed=k, scale=3.0)
    residual = _randn(m, k, dtype=dtype, seed=k + 1, scale=3.0) if with_residual else None
    gamma = _randn(k, dtype=dtype, seed=7) + 1.0
    w = _randn(n, k, dtype=dtype, seed=n, scale=k**-0.5)
    out, new_residual = rms_norm_gemv(x, residual, gamma, 1e-6, w, SMALL)
    expected, expected_residual = rms_norm_gemv_ref(x, residual, gamma, 1e-6, w)
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])
    if with_residual:
        assert expected_residual is not None and new_residual is not None
        assert torch.equal(new_residual, expected_residual)  # x + r, rounded once: exact
    else:
        assert new_residual is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_silu_mul_gemv(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    gate_up = _randn(m, 2 * k, dtype=dtype, seed=k, scale=2.0)
    w = _randn(n, k, dtype=dtype, seed=n, scale=k**-0.5)
    out = silu_mul_gemv(gate_up, w, SMALL)
    torch.testing.assert_close(out.float(), silu_mul_gemv_ref(gate_up, w), **TOL[dtype])


def test_fused_prologue_matches_the_unfused_pair() -> None:
    """The fused norm rounds as rms_norm does: against the norm's own output times the weight
    the difference is the GEMM's summation order only."""
    x, r = (
        _randn(2, 96, dtype=torch.float16, seed=1, scale=4.0),
        _randn(2, 96, dtype=torch.float16, seed=2),
    )
    gamma, w = _randn(96, dtype=torch.float16, seed=3), _randn(33, 96, dtype=torch.float16, seed=4)
    out, _ = rms_norm_gemv(x, r, gamma, 1e-5, w)
    normed, _ = fused_add_rms_norm_ref(x, r, gamma, 1e-5)
    torch.testing.assert_close(out.float(), gemv_ref(normed, w), atol=1e-3, rtol=1e-3)


def test_bad_shapes() -> None:
    w = _randn(8, 32, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="at most"):
        gemv(_randn(MAX_M + 1, 32, dtype=torch.float32, seed=1), w)
    with pytest.raises(ValueError, match="do not fit"):
        gemv(_randn(2, 31, dtype=torch.float32, seed=1), w)
    with pytest.raises(ValueError, match="residual"):
        x = _randn(2, 32, dtype=torch.float32, seed=1)
        rms_norm_gemv(x, x[:1], torch.ones(32, device=DEVICE), 1e-6, w)
    with pytest.raises(ValueError, match="gate/up"):
        silu_mul_gemv(_randn(2, 32, dtype=torch.float32, seed=1), w)
    with pytest.raises(ValueError, match="norm weight"):
        x = _randn(2, 32, dtype=torch.float32, seed=1)
        rms_norm_gemv(x, None, torch.ones(32, dtype=torch.float16, device=DEVICE), 1e-6, w)
    assert gemv(_randn(0, 32, dtype=torch.float32, seed=1), w).shape == (0, 8)
    x, r = _randn(2, 32, dtype=torch.float32, seed=1), _randn(2, 32, dtype=torch.float32, seed=2)
    y, h = rms_norm_gemv(x, r, torch.ones(32, device=DEVICE), 1e-6, w[:0])  # no output features
    assert y.shape == (2, 0) and h is not None and torch.equal(h, x + r)
