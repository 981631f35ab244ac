"""The deferred RMSNorm (kernels/gemv_norm.py; Triton, the interpreter without a GPU) against
float32 torch: gemv with the residual add and the norm's sums in its epilogue, the rms_norm
kernel's deferred variant, gemv's and gemv_rope's row scale; and the chain (deferred norm, then
the scaled GEMM) against the unfused norm, then the GEMM."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from atom.kernels import gemv as gemv_module
from atom.kernels import gemv_norm
from atom.kernels.gemv import SCALE_PARTS, GemvConfig, gemv, gemv_ref, row_rstd_ref
from atom.kernels.gemv_norm import (
    deferred_norm_ref,
    deferred_rows_ref,
    gemv_add_rms_norm,
    gemv_add_rms_norm_ref,
    norm_config,
    parts,
)
from atom.kernels.rms_norm import deferred_rms_norm, fused_add_rms_norm_ref, rms_norm_ref
from tests.kernels.test_gemv import DEVICE, DTYPES, TOL, _randn, descriptors  # noqa: F401

EPS = 1e-5


# (M, N, K): N past a whole number of tiles; K of several tiles and splits
SHAPES = [(1, 200, 96), (3, 64, 256), (16, 72, 130)]
TILES = [
    GemvConfig(block_n=32, block_k=64, num_warps=4, num_stages=2),
    GemvConfig(block_n=16, block_k=32, num_warps=4, num_stages=2, split_k=3),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tile", TILES, ids=["unsplit", "split3"])
@pytest.mark.usefixtures("descriptors")  # weight tiles through descriptors, then pointers
def test_gemv_add_rms_norm(
    dtype: torch.dtype, shape: tuple[int, int, int], tile: GemvConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    m, n, k = shape
    x = _randn(m, k, dtype=dtype, seed=1)
    w = _randn(n, k, dtype=dtype, seed=2, scale=k**-0.5)
    res = _randn(m, n, dtype=dtype, seed=3)
    nw = _randn(n, dtype=dtype, seed=4)
    monkeypatch.setattr(gemv_norm, "norm_config", lambda weight: tile)
    h, r, sumsq = gemv_add_rms_norm(x, w, res, nw)
    h_ref, r_ref, ss_ref = gemv_add_rms_norm_ref(x, w, res, nw)
    assert sumsq.shape == (m, -(-n // tile.block_n)) == ss_ref.shape
    assert sumsq.shape[1] == parts(x, w, None, nw)
    torch.testing.assert_close(r.float(), r_ref.float(), **TOL[dtype])
    torch.testing.assert_close(h.float(), h_ref.float(), **TOL[dtype])
    torch.testing.assert_close(sumsq, ss_ref, rtol=TOL[dtype]["rtol"], atol=1e-3)
    assert h.dtype == r.dtype == dtype and sumsq.dtype == torch.float32


def test_gemv_add_rms_norm_rejects() -> None:
    x = torch.zeros(2, 32, device=DEVICE)
    w = torch.zeros(48, 32, device=DEVICE)
    with pytest.raises(ValueError, match="rows"):
        gemv_add_rms_norm(torch.zeros(17, 32, device=DEVICE), w, torch.zeros(17, 48), w[0, :48])
    with pytest.raises(ValueError, match="do not fit"):
        gemv_add_rms_norm(x, w, torch.zeros(2, 47, device=DEVICE), torch.zeros(48, device=DEVICE))
    with pytest.raises(ValueError, match="not fused"):
        gemv_add_rms_norm(x, w, torch.zeros(2, 48, device=DEVICE),
                          torch.zeros(48, dtype=torch.float16, device=DEVICE))  # fmt: skip


def test_parts_follow_the_tile() -> None:
    w = torch.empty(4096, 4096)
    nw = torch.empty(4096)
    block_n = gemv_module.tile_sizes(norm_config(w), 1, 4096, 4096)[1]
    assert parts(w[:1], w, None, nw) == 4096 // block_n
    assert parts(w[:1], w, torch.empty(4096), nw) == 1  # a bias: the norm runs apart
    assert parts(w[:1].half(), w, None, nw) == 1  # dtypes differ


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_deferred_rms_norm_kernel(dtype: torch.dtype, residual: bool) -> None:
    x = _randn(5, 300, dtype=dtype, seed=5)
    res = _randn(5, 300, dtype=dtype, seed=6) if residual else None
    w = _randn(300, dtype=dtype, seed=7)
    h, r, sumsq = deferred_rms_norm(x, res, w)
    r_ref = x + res if res is not None else x
    h_ref, ss_ref = deferred_norm_ref(r_ref, w)
    assert (r is None) == (res is None) and sumsq.shape == (5, 1)
    if r is not None:
        torch.testing.assert_close(r, r_ref)
    torch.testing.assert_close(h.float(), h_ref.float(), **TOL[dtype])
    torch.testing.assert_close(sumsq, ss_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("num_parts", [1, 7, SCALE_PARTS + 5])
def test_gemv_row_scale(dtype: torch.dtype, gated: bool, num_parts: int) -> None:
    """Each row's sums times its 1/rms from num_parts partial sums (past SCALE_PARTS: a second
    load of them), split K and not."""
    m, n, k = 3, 40, 130
    x = _randn(m, k, dtype=dtype, seed=8)
    w = _randn(2 * n if gated else n, k, dtype=dtype, seed=9, scale=k**-0.5)
    sumsq = _randn(m, num_parts, dtype=torch.float32, seed=10).abs() * k / num_parts
    for split in (1, 3):
        cfg = GemvConfig(block_n=16, block_k=32, num_warps=4, num_stages=2, split_k=split)
        y = gemv(x, w, cfg, gated=gated, row_scale=(sumsq, EPS))
        ref = gemv_ref(x, w) * row_rstd_ref((sumsq, EPS), k)
        if gated:
            gate, up = ref.to(dtype).float().chunk(2, dim=-1)
            ref = F.silu(gate) * up
        torch.testing.assert_close(y.float(), ref, **TOL[dtype])


def test_gemv_row_scale_rejects_bad_sums() -> None:
    x, w = torch.zeros(3, 32, device=DEVICE), torch.zeros(16, 32, device=DEVICE)
    with pytest.raises(ValueError, match="row scale"):
        gemv(x, w, row_scale=(torch.zeros(2, 4, device=DEVICE), EPS))
    with pytest.raises(ValueError, match="row scale"):
        gemv(x, w, row_scale=(torch.zeros(3, 4, dtype=torch.float16, device=DEVICE), EPS))


@pytest.mark.parametrize("dtype", DTYPES)
def test_chain_matches_the_unfused_norm(dtype: torch.dtype) -> None:
    """o_proj, residual add and norm deferred, then the next GEMM scaled, against o_proj,
    fused_add_rms_norm, then the GEMM: the same values to a rounding of the model dtype; a
    consumer that cannot scale reads the rows made whole."""
    m, hidden, k, n = 4, 96, 64, 80
    x = _randn(m, k, dtype=dtype, seed=11)
    w_o = _randn(hidden, k, dtype=dtype, seed=12, scale=k**-0.5)
    res = _randn(m, hidden, dtype=dtype, seed=13)
    nw = _randn(hidden, dtype=dtype, seed=14)
    w_next = _randn(n, hidden, dtype=dtype, seed=15, scale=hidden**-0.5)
    cfg = dataclasses.replace(GemvConfig(), block_n=32, block_k=32, num_stages=2)
    h, r, sumsq = gemv_add_rms_norm(x, w_o, res, nw, cfg)
    y = gemv(h, w_next, cfg, row_scale=(sumsq, EPS))
    normed, r_ref = fused_add_rms_norm_ref(gemv_ref(x, w_o).to(dtype), res, nw, EPS)
    torch.testing.assert_close(r, r_ref)
    torch.testing.assert_close(y.float(), gemv_ref(normed, w_next), **TOL[dtype])
    torch.testing.assert_close(
        deferred_rows_ref(h, sumsq, EPS).float(), rms_norm_ref(r, nw, EPS).float(), **TOL[dtype]
    )
