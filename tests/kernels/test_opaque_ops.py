"""The opaque ops that compiled pieces call (`atom::rms_norm`, `atom::fused_add_rms_norm`,
`atom::silu_and_mul`): schema, fake (meta) functions and results against the references, by
torch.library.opcheck (the Triton interpreter without a GPU)."""

from __future__ import annotations

import pytest
import torch

import atom.kernels.ops  # noqa: F401  (registers the ops)
from atom.kernels.rms_norm import fused_add_rms_norm_ref, rms_norm_ref
from atom.kernels.silu_and_mul import silu_and_mul_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=1e-5, rtol=1e-5)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE)


@pytest.mark.parametrize("shape", [(5, 64), (3, 4, 32), (0, 64)])
@pytest.mark.parametrize(
    ("dtype", "weight_dtype"), [(torch.float32, torch.float32), (torch.float16, torch.float32)]
)
def test_rms_norm_ops(
    shape: tuple[int, ...], dtype: torch.dtype, weight_dtype: torch.dtype
) -> None:
    """Rows of one dtype with a weight of another (the output takes the promoted dtype, as the
    launcher's does), and no rows at all."""
    x, residual = _randn(*shape, seed=0).to(dtype), _randn(*shape, seed=1).to(dtype)
    weight = _randn(shape[-1], seed=2).to(weight_dtype)
    torch.library.opcheck(torch.ops.atom.rms_norm, (x, weight, 1e-6))
    torch.library.opcheck(torch.ops.atom.fused_add_rms_norm, (x, residual, weight, 1e-6))
    tol = TOL if dtype == torch.float32 else dict(atol=1e-3, rtol=2e-3)
    out = torch.ops.atom.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(out, rms_norm_ref(x, weight, 1e-6), **tol)
    normed, summed = torch.ops.atom.fused_add_rms_norm(x, residual, weight, 1e-6)
    ref_normed, ref_summed = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    torch.testing.assert_close(normed, ref_normed, **tol)
    torch.testing.assert_close(summed, ref_summed, **tol)


def test_rms_norm_ops_on_strided_views() -> None:
    """Per-head views of a fused projection's rows (read in place by the launcher) and a residual
    of another layout: the outputs are new contiguous tensors, as the fakes say."""
    qkv = _randn(5, 3, 4, 32, seed=4)
    q, residual = qkv[:, 0], _randn(4, 5, 32, seed=5).transpose(0, 1)
    weight = _randn(32, seed=6)
    torch.library.opcheck(torch.ops.atom.rms_norm, (q, weight, 1e-6))
    torch.library.opcheck(torch.ops.atom.fused_add_rms_norm, (q, residual, weight, 1e-6))
    out = torch.ops.atom.rms_norm(q, weight, 1e-6)
    assert out.is_contiguous()
    torch.testing.assert_close(out, rms_norm_ref(q, weight, 1e-6), **TOL)


def test_rms_norm_fakes_reject_bad_shapes() -> None:
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x, weight = torch.empty(4, 8), torch.empty(7)
        with pytest.raises(ValueError, match="does not match"):
            torch.ops.atom.rms_norm(x, weight, 1e-6)
        with pytest.raises(ValueError, match="residual"):
            torch.ops.atom.fused_add_rms_norm(x, torch.empty(4, 9), torch.empty(8), 1e-6)


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 48)])
def test_silu_and_mul_op(shape: tuple[int, ...]) -> None:
    x = _randn(*shape, seed=3)
    torch.library.opcheck(torch.ops.atom.silu_and_mul, (x,))
    torch.testing.assert_close(torch.ops.atom.silu_and_mul(x), silu_and_mul_ref(x), **TOL)


def test_silu_and_mul_fake_rejects_odd_width() -> None:
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x = torch.empty(4, 7)
        with pytest.raises(ValueError, match="even"):
            torch.ops.atom.silu_and_mul(x)
