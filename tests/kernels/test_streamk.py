"""The stream-K GEMM (Triton; the interpreter without a GPU) against float32 torch: ranges that
cover whole tiles, parts of two or three tiles, programs inside one tile; TMA descriptors and
pointer loads; odd sizes, strided rows; the tile counters rearmed after each launch."""

from __future__ import annotations

import pytest
import torch

from atom.kernels.gemv import (
    GemvConfig,
    config_entry,
    config_from_entry,
    gemv_ref,
    matmul,
)
from atom.kernels.streamk import StreamKConfig, streamk_gemm
from atom.kernels.tile_counters import tile_counters

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


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize(
    ("m", "n", "k", "programs"),
    [
        (5, 48, 80, 7),  # 3 tiles x 5 iterations in 7 ranges of 3: parts of two tiles each
        (33, 40, 96, 5),  # 3 x 3 tiles x 6 iterations: whole tiles and parts
        (20, 64, 64, 3),  # 4 tiles, 4 iterations each, 3 programs of 6
        (8, 16, 256, 13),  # one tile of 16 iterations, 13 programs inside it (the last empty)
        (3, 37, 100, 0),  # the default count of programs (4 on the CPU)
        (17, 16, 48, 1),  # one program over every tile: all whole
    ],
)
def test_streamk(m: int, n: int, k: int, programs: int, tma: bool, dtype: torch.dtype) -> None:
    cfg = StreamKConfig(16, 16, 16, 4, 2, programs, tma)
    for seed in (0, 1):  # twice: each launch rearms the counters the next one reuses
        x = _randn(m, k, dtype=dtype, seed=k + seed)
        w = _randn(n, k, dtype=dtype, seed=n + seed, scale=k**-0.5)
        out = streamk_gemm(x, w, cfg)
        assert out.shape == (m, n) and out.dtype == dtype
        torch.testing.assert_close(out.float(), gemv_ref(x, w), **TOL[dtype])
    assert not tile_counters(x.device, 1).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_streamk_strided_rows(dtype: torch.dtype) -> None:
    """Rows of a wider tensor: a 16-byte aligned view reads through TMA, another not."""
    w = _randn(24, 72, dtype=dtype, seed=0, scale=72**-0.5)
    for offset in (8, 3):
        x = _randn(19, 72 + offset, dtype=dtype, seed=offset)[:, offset:]
        out = streamk_gemm(x, w, StreamKConfig(16, 16, 32, 4, 2, 5))
        torch.testing.assert_close(out.float(), gemv_ref(x, w), **TOL[dtype])


def test_streamk_bad_shapes() -> None:
    w = _randn(8, 32, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="do not fit"):
        streamk_gemm(_randn(2, 31, dtype=torch.float32, seed=1), w)
    with pytest.raises(ValueError, match="differ"):
        streamk_gemm(_randn(2, 32, dtype=torch.float16, seed=1), w)
    assert streamk_gemm(_randn(0, 32, dtype=torch.float32, seed=1), w).shape == (0, 8)


def test_table_entries_and_dispatch() -> None:
    """A table entry names its kernel; matmul runs the kernel of the config's kind."""
    tile, streamk = GemvConfig(16, 32, 4, 2, 16), StreamKConfig(16, 16, 16, 4, 2, 3)
    assert config_entry(streamk)["kind"] == "streamk" and "kind" not in config_entry(tile)
    assert config_from_entry(config_entry(streamk)) == streamk
    assert config_from_entry(config_entry(tile)) == tile
    x = _randn(20, 40, dtype=torch.float32, seed=2)
    w = _randn(24, 40, dtype=torch.float32, seed=3)
    for cfg in (tile, streamk):
        torch.testing.assert_close(matmul(x, w, cfg), gemv_ref(x, w), **TOL[torch.float32])
