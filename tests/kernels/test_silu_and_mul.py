"""silu_and_mul (Triton; the interpreter without a GPU) against the float32-inside reference."""

from __future__ import annotations

import pytest
import torch

from atom.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=1e-3)}


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("num_tokens", "d"), [(1, 64), (7, 769), (33, 64), (2, 1537)])
def test_silu_and_mul(num_tokens: int, d: int, dtype: torch.dtype) -> None:
    x = _randn(num_tokens, 2 * d, dtype=dtype, seed=d)
    out = silu_and_mul(x)
    assert out.shape == (num_tokens, d)
    torch.testing.assert_close(out, silu_and_mul_ref(x), **TOL[dtype])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy
def test_silu_and_mul_extremes_and_views() -> None:
    """exp overflow at very negative gates gives -0, not NaN; 3-D and strided inputs."""
    x = _randn(2, 3, 2 * 65, dtype=torch.float32, seed=11, scale=60.0)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **TOL[torch.float32])
    wide = _randn(5, 2 * 100, dtype=torch.float32, seed=12)[:, 10:140]  # row stride 200
    torch.testing.assert_close(silu_and_mul(wide), silu_and_mul_ref(wide), **TOL[torch.float32])
    assert silu_and_mul(x[:0]).shape == (0, 3, 65)
