"""The opaque ops that compiled pieces call (`atom::rms_norm`, `atom::fused_add_rms_norm`,
`atom::silu_and_mul`, the deferred norm's): schema, fake (meta) functions and results against
the references, by torch.library.opcheck (the Triton interpreter without a GPU)."""

from __future__ import annotations

import pytest
import torch

from atom.kernels import linear_ops  # registers the ops
from atom.kernels.gemv import MAX_M
from atom.kernels.gemv_norm import parts
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


@pytest.fixture
def decode_rows_defer(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ops decides on CUDA: norms of 1-16 rows defer (kernels/gemv_norm.py)."""
    monkeypatch.setattr(linear_ops, "defers_norm", lambda x: 0 < x.numel() // x.shape[-1] <= MAX_M)


# Past 16 rows the sums are not written: the checks that compare outputs are left out there.
ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor",
              "test_aot_dispatch_dynamic")  # fmt: skip
NO_OUTPUT_CHECKS = ("test_schema", "test_faketensor")


@pytest.mark.parametrize("rows", [3, 20])
def test_deferred_norm_ops(rows: int, decode_rows_defer: None) -> None:
    """The deferred norm's ops (rms_norm_rows, add_rms_norm_rows, linear_add_rms_norm, linear
    with sums): fakes against the launchers, the fused launch's columns of sums, and the chain
    against the unfused norm, then the GEMM."""
    x, residual = _randn(rows, 64, seed=7), _randn(rows, 160, seed=8)
    w_o, w_next = _randn(160, 64, seed=9) / 8, _randn(24, 160, seed=10) / 12
    norm_weight = _randn(160, seed=11)
    utils = ALL_CHECKS if rows <= MAX_M else NO_OUTPUT_CHECKS
    for op, args in (
        (torch.ops.atom.rms_norm_rows, (residual, norm_weight, 1e-6)),
        (torch.ops.atom.add_rms_norm_rows, (residual, residual, norm_weight, 1e-6)),
        (torch.ops.atom.linear_add_rms_norm, (x, w_o, None, residual, norm_weight, 1e-6)),
    ):
        torch.library.opcheck(op, args, test_utils=utils)
    h, r, sumsq = torch.ops.atom.linear_add_rms_norm(x, w_o, None, residual, norm_weight, 1e-6)
    assert sumsq.shape == (rows, parts(x, w_o, None, norm_weight))
    assert rows > MAX_M or sumsq.shape[1] > 1  # the fused launch: a column a tile
    normed, ref_r = fused_add_rms_norm_ref(x @ w_o.T, residual, norm_weight, 1e-6)
    torch.testing.assert_close(r, ref_r, **TOL)
    torch.library.opcheck(torch.ops.atom.linear, (h, w_next, None, sumsq, 1e-6), test_utils=utils)
    y = torch.ops.atom.linear(h, w_next, None, sumsq, 1e-6)
    torch.testing.assert_close(y, normed @ w_next.T, atol=1e-4, rtol=1e-4)
