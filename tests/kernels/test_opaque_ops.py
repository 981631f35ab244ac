"""The opaque ops that ATOM_OPAQUE_NORMS=1 puts in compiled pieces (`atom::rms_norm`,
`atom::fused_add_rms_norm`, `atom::silu_and_mul`): schema, fake (meta) functions and results
against the references, by torch.library.opcheck (the Triton interpreter without a GPU)."""

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


@pytest.mark.parametrize("shape", [(5, 64), (3, 4, 32)])
def test_rms_norm_ops(shape: tuple[int, ...]) -> None:
    x, residual, weight = _randn(*shape, seed=0), _randn(*shape, seed=1), _randn(shape[-1], seed=2)
    torch.library.opcheck(torch.ops.atom.rms_norm, (x, weight, 1e-6))
    torch.library.opcheck(torch.ops.atom.fused_add_rms_norm, (x, residual, weight, 1e-6))
    out = torch.ops.atom.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(out, rms_norm_ref(x, weight, 1e-6), **TOL)
    normed, summed = torch.ops.atom.fused_add_rms_norm(x, residual, weight, 1e-6)
    ref_normed, ref_summed = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    torch.testing.assert_close(normed, ref_normed, **TOL)
    torch.testing.assert_close(summed, ref_summed, **TOL)


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
