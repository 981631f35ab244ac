"""gemv (Triton; the interpreter without a GPU) against float32 torch: odd sizes, strided rows,
row counts 1 to MAX_M, and past it in row tiles, weights through tensor descriptors and through
pointers; the tuned table and where it applies."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from atom.kernels import gemv as gemv_module
from atom.kernels.gemv import (
    GATED_SUFFIX,
    MAX_M,
    MAX_TUNED_M,
    TUNED_BUCKETS,
    TUNED_CAPABILITY,
    TUNED_CONFIGS,
    GemvConfig,
    _tuned_table,
    gated_tile,
    gemv,
    gemv_config,
    gemv_ref,
    gemv_silu_and_mul_ref,
    linear_config,
    row_bucket,
    shape_key,
    tuned_buckets,
)
from tests.kernels.compiled import run_compiled

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


HOPPER = DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9  # the interpreter or sm90+


@pytest.fixture(params=[True, False], ids=["descriptor", "pointers"])
def descriptors(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Weight tiles through tensor descriptors where they can be, or pointer loads only."""
    monkeypatch.setattr(gemv_module, "DESCRIPTORS", request.param)
    return request.param


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """(W_DESC, X_DESC) of each gemv launch."""
    seen: list[tuple[bool, bool]] = []
    real = gemv_module.launch

    def recorded(kernel: object, grid: tuple[int, ...], *args: object, **kwargs: object) -> None:
        seen.append((bool(kwargs["W_DESC"]), bool(kwargs["X_DESC"])))
        real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(gemv_module, "launch", recorded)
    return seen


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_gemv(
    m: int, n: int, k: int, dtype: torch.dtype, descriptors: bool, paths: list[tuple[bool, bool]]
) -> None:
    x = _randn(m, k + 5, dtype=dtype, seed=k)[:, 5:]  # rows strided, not contiguous
    w = _randn(n, k, dtype=dtype, seed=n, scale=k**-0.5)
    out = gemv(x, w, SMALL)
    assert paths == [(descriptors and HOPPER and _aligned(w), False)]
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(out.float(), gemv_ref(x, w), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "n", "k", "split_k", "block_m"),
    [
        (1, 67, 300, 2, 0),
        (3, 40, 129, 3, 0),
        (MAX_M, 33, 640, 4, 0),
        (37, 40, 200, 2, 16),
        (1, 40, 300, 4, 0),
        (2, 40, 100, 8, 0),
    ],
)
def test_split_k(
    m: int, n: int, k: int, split_k: int, block_m: int, dtype: torch.dtype, descriptors: bool
) -> None:
    """Splits of K in 64-element tiles, each tile's last split adding them: uneven (5 tiles in
    2, 3 in 3 with a last of one element, 10 in 4), an empty last split (5 tiles in 4: 2, 2, 1,
    0) and more splits than tiles (2 tiles: 2 splits, not 8); twice, since each launch rearms
    the tile counters the next one reuses."""
    cfg = GemvConfig(16, 64, 4, 2, block_m, split_k)
    for seed in (0, 1):
        x = _randn(m, k + 5, dtype=dtype, seed=k + seed)[:, 5:]
        w = _randn(n, k, dtype=dtype, seed=n + seed, scale=k**-0.5)
        torch.testing.assert_close(gemv(x, w, cfg).float(), gemv_ref(x, w), **TOL[dtype])
    assert not gemv_module._COUNTERS[x.device].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "n", "k", "split_k", "block_m"),
    [(1, 67, 296, 1, 0), (3, 40, 129, 3, 0), (MAX_M, 33, 640, 4, 0), (2, 40, 136, 4, 0),
     (37, 40, 200, 2, 16), (40, 24, 296, 1, 32)],
)  # fmt: skip
def test_gated(
    m: int, n: int, k: int, split_k: int, block_m: int, dtype: torch.dtype, descriptors: bool,
    paths: list[tuple[bool, bool]],
) -> None:  # fmt: skip
    """SwiGLU fused: weight [2n, k] of gate rows then up rows -> silu(gate) * up [m, n]; gate
    tiles past n (n not a multiple of the tile), splits uneven and empty (K tiles of 32: 5 in 4
    splits of 2, 2, 1, 0), row tiles with x through a descriptor (40 rows in tiles of 32);
    twice, the tile counters rearmed."""
    cfg = GemvConfig(16, 32, 4, 2, block_m, split_k)
    for seed in (0, 1):
        x = _randn(m, k, dtype=dtype, seed=k + seed)
        w = _randn(2 * n, k, dtype=dtype, seed=n + seed, scale=k**-0.5)
        out = gemv(x, w, cfg, gated=True)
        assert out.shape == (m, n) and out.dtype == dtype
        torch.testing.assert_close(out.float(), gemv_silu_and_mul_ref(x, w), **TOL[dtype])
    desc = descriptors and HOPPER and _aligned(w)
    assert paths == [(desc, desc and block_m >= 32)] * 2
    assert not gemv_module._COUNTERS.get(x.device, torch.zeros(1)).any()


def test_gated_needs_gate_and_up_rows_alike() -> None:
    x, w = _randn(2, 64, dtype=torch.float32, seed=0), _randn(41, 64, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="gate and up rows alike"):
        gemv(x, w, gated=True)


@pytest.mark.skipif(not HOPPER, reason="tensor descriptors need sm90 or the interpreter")
def test_tile_descriptor_where_the_copy_engine_can(monkeypatch: pytest.MonkeyPatch) -> None:
    """16-byte aligned rows of their own and tiles of at most MAX_DESC_BOX a side take a
    descriptor; an unaligned row (K = 300 halves: 600 bytes), a misaligned start, a longer tile,
    rows that share memory (stride 0), no element, or ATOM_GEMV_TMA=0 do not."""
    monkeypatch.setattr(gemv_module, "DESCRIPTORS", True)
    w = _randn(64, 320, dtype=torch.float16, seed=0)
    desc = gemv_module.tile_descriptor(w, 32, 128)
    assert desc is not None and list(desc.block_shape) == [32, 128]
    descriptor = gemv_module.tile_descriptor
    assert descriptor(w, 32, 2 * gemv_module.MAX_DESC_BOX) is None
    assert descriptor(_randn(64, 300, dtype=torch.float16, seed=0), 32, 128) is None
    assert descriptor(w.flatten()[1 : 1 + 64 * 8].view(64, 8), 16, 16) is None
    assert descriptor(w[:1].expand(64, 320), 32, 128) is None
    assert descriptor(w[:, :0], 32, 128) is None
    monkeypatch.setattr(gemv_module, "DESCRIPTORS", False)
    assert descriptor(w, 32, 128) is None


def test_bad_shapes() -> None:
    w = _randn(8, 32, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match="without a row tile"):
        gemv(_randn(MAX_M + 1, 32, dtype=torch.float32, seed=1), w)
    with pytest.raises(ValueError, match="do not fit"):
        gemv(_randn(2, 31, dtype=torch.float32, seed=1), w)
    with pytest.raises(ValueError, match="differ"):
        gemv(_randn(2, 32, dtype=torch.float16, seed=1), w)
    assert gemv(_randn(0, 32, dtype=torch.float32, seed=1), w).shape == (0, 8)
    assert gemv(_randn(2, 32, dtype=torch.float32, seed=1), w[:0]).shape == (2, 0)


ROW_TILES = GemvConfig(block_n=16, block_k=64, num_warps=4, num_stages=2, block_m=16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), [(MAX_M + 1, 40, 72), (45, 33, 136), (45, 33, 129)])
def test_row_tiles(
    m: int, n: int, k: int, dtype: torch.dtype, descriptors: bool, paths: list[tuple[bool, bool]]
) -> None:
    """Past MAX_M rows, with a row tile: several row tiles, the last partial, K not a whole tile
    (aligned weight rows but for K = 129); and the same tile with pointer loads asked for
    (descriptor=False)."""
    x = _randn(m, k + 3, dtype=dtype, seed=m)[:, 3:]
    w = _randn(n, k, dtype=dtype, seed=n, scale=k**-0.5)
    for cfg in (ROW_TILES, dataclasses.replace(ROW_TILES, descriptor=False)):
        out = gemv(x, w, cfg)
        assert out.shape == (m, n)
        torch.testing.assert_close(out.float(), gemv_ref(x, w), **TOL[dtype])
    assert paths == [(descriptors and HOPPER and _aligned(w), False), (False, False)]


@pytest.mark.skipif(not HOPPER, reason="tensor descriptors need sm90 or the interpreter")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("n", [40, 7])
def test_row_tiles_with_x_through_a_descriptor(
    dtype: torch.dtype,
    split_k: int,
    n: int,
    paths: list[tuple[bool, bool]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Row tiles of X_DESC_ROWS or more with aligned rows take x's tiles through a descriptor
    as well: the last row tile partial (the copy reads zeros past M), K not a whole tile, and
    (n = 7) a weight tile longer than the weight has rows."""
    monkeypatch.setattr(gemv_module, "DESCRIPTORS", True)
    m, k = 45, 200
    x = _randn(m, k, dtype=dtype, seed=3)
    w = _randn(n, k, dtype=dtype, seed=4, scale=k**-0.5)
    cfg = GemvConfig(16, 64, 4, 2, block_m=gemv_module.X_DESC_ROWS, split_k=split_k)
    torch.testing.assert_close(gemv(x, w, cfg).float(), gemv_ref(x, w), **TOL[dtype])
    assert paths == [(True, True)]


@pytest.mark.skipif(not HOPPER, reason="tensor descriptors need sm90 or the interpreter")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "split_k"), [(1, 1), (5, 3), (MAX_M, 2)])
def test_x_through_a_descriptor_from_one_row(
    m: int,
    split_k: int,
    dtype: torch.dtype,
    paths: list[tuple[bool, bool]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ATOM_GEMV_X_DESC_ROWS=16: the one row tile of 1-16 rows takes x's tiles through a
    descriptor too (the copy reads zeros past M and K); plain and gated."""
    monkeypatch.setattr(gemv_module, "DESCRIPTORS", True)
    monkeypatch.setattr(gemv_module, "X_DESC_ROWS", MAX_M)
    k, n = 200, 40
    x = _randn(m, k, dtype=dtype, seed=m)
    w = _randn(2 * n, k, dtype=dtype, seed=n, scale=k**-0.5)
    cfg = GemvConfig(16, 64, 4, 2, split_k=split_k)
    torch.testing.assert_close(gemv(x, w, cfg).float(), gemv_ref(x, w), **TOL[dtype])
    out = gemv(x, w, cfg, gated=True)
    torch.testing.assert_close(out.float(), gemv_silu_and_mul_ref(x, w), **TOL[dtype])
    assert paths == [(True, True)] * 2


# The gemv kernel's source for one variant (an sm90 compile script's prelude).
_GEMV_SOURCE = """
from tests.kernels.compiled import compile_in_parallel

def gemv_source(dt, bm, bn, bk, split, w_desc, x_desc, gated, scale):
    from triton.compiler import ASTSource
    from atom.kernels.gemv import _gemv_kernel
    sig = {"x": f"tensordesc<{dt}[{bm}, {bk}]>" if x_desc else f"*{dt}",
           "w": f"tensordesc<{dt}[{bn}, {bk}]>" if w_desc else f"*{dt}", "y_ptr": f"*{dt}",
           "ws_ptr": "*fp32", "count_ptr": "*i32", "ss_ptr": "*fp32", "M": "i32", "N": "i32",
           "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "parts": "i32", "eps": "fp32"}
    const = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "W_DESC": w_desc,
             "X_DESC": x_desc, "DOT_PRECISION": "ieee" if dt == "fp32" else "tf32", "PDL": True,
             "GATED": gated, "ROW_SCALE": scale}
    sig.update(dict.fromkeys(const, "constexpr"))
    return ASTSource(fn=_gemv_kernel, signature=sig, constexprs=const)
"""

# Every variant of the kernel compiled for sm90 (not interpreted): a compile error shows on the
# CPU machine. Its own process: this one's kernels were defined for the interpreter.
_COMPILE_VARIANTS = (
    _GEMV_SOURCE
    + """
import itertools

def compile_one(job):
    dt, (w_desc, x_desc, bm), split, gated, scale = job
    return gemv_source(dt, bm, 64, 64, split, w_desc, x_desc, gated, scale), {}, job

jobs = [job for job in itertools.product(
    ("bf16", "fp32"), ((False, False, 16), (True, False, 16), (True, True, 16), (True, True, 32)),
    (1, 3), (False, True), (False, True)
) if not (job[4] and job[0] == "fp32")]  # the deferred norm's scale: bf16 is enough
for _, job in compile_in_parallel(compile_one, jobs):
    print("compiled", *job, flush=True)
"""
)


# The gated variant of every tile of the tuned table (linear_ops.linear_silu_and_mul takes the
# table's gated tile of the gate/up weight, else its plain tile with K halved), and every 1-16-row
# tile plain and gated with x's tiles through a descriptor (ATOM_GEMV_X_DESC_ROWS=16), bf16,
# compiled for sm90: their shared memory fits an H100/H200's 227 KB.
_TABLE_TILES = (
    _GEMV_SOURCE
    + """
import json
from atom.kernels.gemv import GATED_SUFFIX, MAX_M, TUNED_CONFIGS, X_DESC_ROWS, GemvConfig
from atom.kernels.gemv import gated_tile, tile_sizes

def compile_one(job):
    (gated, bm, bn, bk, split, warps, stages, w_desc, x_desc), name = job
    source = gemv_source("bf16", bm, bn, bk, split, w_desc, x_desc, gated, True)
    return source, {"num_warps": warps, "num_stages": stages}, name

jobs, seen = [], set()
for key, buckets in json.loads(TUNED_CONFIGS.read_text())["shapes"].items():
    gated_key = key.endswith(GATED_SUFFIX)
    n2, k = map(int, key.removesuffix(GATED_SUFFIX).split("x"))
    for bucket, entry in buckets.items():
        if entry is None:
            continue
        cfg = GemvConfig(**entry)
        launches = [("gated", cfg if gated_key else gated_tile(cfg), False)]
        if int(bucket) == MAX_M:
            launches.append(("gated-x16", cfg if gated_key else gated_tile(cfg), True))
            if not gated_key:
                launches.append(("plain-x16", cfg, True))
        for kind, tile, x16 in launches:
            gated = kind.startswith("gated")
            n = n2 // 2 if gated else n2
            bm, bn, bk, split = tile_sizes(tile, min(int(bucket), MAX_M), n, k)
            w_desc = tile.descriptor
            x_desc = w_desc and (bm >= X_DESC_ROWS or x16)
            variant = (gated, bm, bn, bk, split, tile.num_warps, tile.num_stages, w_desc, x_desc)
            if variant not in seen:
                seen.add(variant)
                jobs.append((variant, f"{kind} {key} {bucket}"))
for shared, name in compile_in_parallel(compile_one, jobs):
    print("shared", name, shared, flush=True)
"""
)
SM90_SHARED = 232448  # bytes of shared memory a block may take on an H100/H200


@pytest.mark.skipif(DEVICE != "cpu", reason="a GPU runs the kernels themselves")
def test_table_tiles_fit_shared_memory() -> None:
    stdout = run_compiled(_TABLE_TILES)
    sizes = {" ".join(line.split()[1:4]): int(line.split()[4]) for line in stdout.splitlines()}
    assert {key.split()[0] for key in sizes} == {"gated", "gated-x16", "plain-x16"}, sizes
    assert all(size <= SM90_SHARED for size in sizes.values()), sizes


@pytest.mark.skipif(DEVICE != "cpu", reason="a GPU runs the kernels themselves")
def test_every_variant_compiles_for_sm90() -> None:
    assert run_compiled(_COMPILE_VARIANTS).count("compiled") == 48


def test_row_buckets() -> None:
    assert [row_bucket(r) for r in (1, MAX_M, MAX_M + 1, 32, 33, 64, 100, 200, MAX_TUNED_M)] == [
        MAX_M, MAX_M, 32, 32, 64, 64, 128, 256, MAX_TUNED_M
    ]  # fmt: skip


def test_tuned_table_is_well_formed() -> None:
    """The committed table: buckets of TUNED_BUCKETS, tiles the kernel takes (or null: cuBLAS)."""
    table = json.loads(TUNED_CONFIGS.read_text())
    assert table["device"].startswith("NVIDIA H")
    for key, by_bucket in table["shapes"].items():
        n, k = (int(v) for v in key.removesuffix(GATED_SUFFIX).split("x"))
        assert n > 0 and k > 0
        if key.endswith(GATED_SUFFIX):  # a gate/up weight's gated tiles, beside its plain ones
            assert n % 2 == 0 and key.removesuffix(GATED_SUFFIX) in table["shapes"]
        assert {int(b) for b in by_bucket} <= set(TUNED_BUCKETS)
        for bucket, cfg in by_bucket.items():
            if cfg is not None:
                tile = GemvConfig(**cfg)
                assert tile.block_n >= 16 and tile.block_k >= 16 and tile.split_k >= 1
                # rows 1-16: one tile of all rows; past them row tiles
                assert tile.block_m == 0 if int(bucket) == MAX_M else tile.block_m >= 16
    assert _tuned_table().keys() == table["shapes"].keys()


def test_linear_config_gated(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gated launch takes the table's gated tile where it has one (None: the pair runs), else
    the plain choice with K halved; untabled, gemv_config's rule for half the rows, K halved."""
    plain, fused = GemvConfig(64, 128, 4, 4, 32), GemvConfig(32, 256, 4, 3, 0, 2)
    monkeypatch.setattr(gemv_module, "_tuned_table", lambda: {
        "8x32": {MAX_M: plain, 64: plain, 128: None},
        "8x32" + GATED_SUFFIX: {MAX_M: fused, 64: None},
    })  # fmt: skip
    monkeypatch.setattr(gemv_module, "_capability", lambda index: TUNED_CAPABILITY)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    w = torch.empty(8, 32, dtype=torch.bfloat16)
    assert shape_key(8, 32, gated=True) == "8x32" + GATED_SUFFIX
    assert linear_config(1, w, gated=True) == fused and linear_config(1, w) == plain
    assert linear_config(64, w, gated=True) is None  # the pair won: gemv's plain tile and SiLU
    assert linear_config(128, w, gated=True) is None  # cuBLAS and SiLU
    monkeypatch.setattr(gemv_module, "_tuned_table", lambda: {"8x32": {MAX_M: plain}})
    assert linear_config(1, w, gated=True) == gated_tile(plain) == GemvConfig(64, 64, 4, 4, 32)
    assert tuned_buckets(w, gated=True) == [MAX_M]
    untabled = torch.empty(8, 48, dtype=torch.bfloat16)
    assert linear_config(1, untabled, gated=True) == gated_tile(gemv_config(4, 48))
    monkeypatch.setattr(gemv_module, "_tuned_table", lambda: {
        "8x32": {MAX_M: None, 32: None}, "8x32" + GATED_SUFFIX: {32: fused},
    })  # fmt: skip
    assert tuned_buckets(w) == [] and tuned_buckets(w, gated=True) == [32]
    assert linear_config(20, w, gated=True) == fused and linear_config(20, w) is None
    # the gated entries apply where the plain ones do: 16-bit weights, the tuned capability
    assert linear_config(20, w.float(), gated=True) is None
    monkeypatch.setattr(gemv_module, "_capability", lambda index: (8, 0))
    assert linear_config(20, w, gated=True) is None and tuned_buckets(w, gated=True) == []


def test_gated_default_tile_halves_k(monkeypatch: pytest.MonkeyPatch) -> None:
    """gemv(gated=True) without a config launches gemv_config's tile for its outputs with half
    its K: 64 where the plain launch of the same outputs takes 128."""
    launched = []
    monkeypatch.setattr(gemv_module, "launch", lambda kernel, grid, *a, **kw: launched.append(kw))
    x, w = torch.zeros(2, 300), torch.zeros(80, 300)
    gemv(x, w, gated=True)
    gemv(x, w[:40])
    assert [kw["BLOCK_K"] for kw in launched] == [64, 128] == [
        gated_tile(gemv_config(40, 300)).block_k, gemv_config(40, 300).block_k
    ]  # fmt: skip


def test_linear_config_applies_only_where_tuned(monkeypatch: pytest.MonkeyPatch) -> None:
    tile, small = GemvConfig(64, 128, 4, 4, 32), GemvConfig(32, 128, 4, 4, 0, 2)
    monkeypatch.setattr(
        gemv_module, "_tuned_table", lambda: {"8x32": {MAX_M: small, 64: tile, 128: None}}
    )
    monkeypatch.setattr(gemv_module, "_capability", lambda index: TUNED_CAPABILITY)
    w = torch.empty(8, 32, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    assert linear_config(1, w) == small and linear_config(MAX_M, w) == small
    assert linear_config(40, w) == tile and linear_config(64, w) == tile
    assert linear_config(65, w) is None and linear_config(MAX_TUNED_M + 1, w) is None  # cuBLAS
    assert linear_config(17, w) is None  # bucket 32 not in the table: cuBLAS
    assert linear_config(40, w.float()) is None  # tuned for 16-bit weights ...
    assert linear_config(1, w.float()) == gemv_config(8, 32)  # ... else the rule up to MAX_M
    assert linear_config(1, torch.empty(8, 48, dtype=torch.bfloat16)) == gemv_config(8, 48)
    assert tuned_buckets(w) == [MAX_M, 64]
    monkeypatch.setattr(gemv_module, "_tuned_table", lambda: {"8x32": {MAX_M: None}})
    assert linear_config(1, w) is None  # cuBLAS won at 1-16 rows
    assert linear_config(1, w, gated=True) is None  # and the pair runs gated too
    monkeypatch.setattr(gemv_module, "_capability", lambda index: (8, 0))
    assert linear_config(40, w) is None and linear_config(1, w) == gemv_config(8, 32)
