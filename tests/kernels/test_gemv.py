"""gemv (Triton; the interpreter without a GPU) against float32 torch: odd sizes, strided rows,
row counts 1 to MAX_M."""

from __future__ import annotations

import pytest
import torch

from atom.kernels.gemv import MAX_M, GemvConfig, gemv, gemv_ref

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


def test_bad_shapes() -> None:
    w = _randn(8, 32, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="at most"):
        gemv(_randn(MAX_M + 1, 32, dtype=torch.float32, seed=1), w)
    with pytest.raises(ValueError, match="do not fit"):
        gemv(_randn(2, 31, dtype=torch.float32, seed=1), w)
    with pytest.raises(ValueError, match="differ"):
        gemv(_randn(2, 32, dtype=torch.float16, seed=1), w)
    assert gemv(_randn(0, 32, dtype=torch.float32, seed=1), w).shape == (0, 8)
    assert gemv(_randn(2, 32, dtype=torch.float32, seed=1), w[:0]).shape == (2, 0)
