"""Linear layers of few rows (decode): y = x @ W^T, read at the weights' bandwidth.

At batch 1 an 8B decode step is its weights read once, and cuBLAS reads the smaller ones below the
bandwidth (H200: qkv 3.3 TB/s, o_proj 3.1, against 4.1 for gate/up; RESULTS.md, tenth sitting).
Here a program computes a [BLOCK_M, BLOCK_N] tile of y, streaming its [BLOCK_N, K] slab of W in
[BLOCK_N, BLOCK_K] tiles through a pipelined tl.dot; row tiles run fastest in the grid, so the
programs that share a slab of W run together and read it from L2 once. The row count is not
specialised: one variant per weight shape and tile.

The weight tiles come through a tensor descriptor (the tensor memory accelerator's bulk copies,
Hopper and later) as the dot's first operand, y^T = W x^T, where the weight's rows allow it
(`tile_descriptor`) and the tile asks for it (`GemvConfig.descriptor`; the table's row tiles
past 16 rows tuned with pointer loads say so); else pointer loads. Row tiles of
X_DESC_ROWS or more take x's tiles through a descriptor as well. H200, the 8B's
GEMMs at one row, CUDA graphs over cold weights, best tile of each: qkv 15.4 -> 13.9 us, o 11.7 ->
9.9, down 31.3 -> 28.7 against the pointer kernel's tuned tiles, gate/up 55.6 against cuBLAS's
56.1; end to end the 8B's batch-1 step 4.53 -> 4.33 ms (RESULTS, twenty-ninth sitting).
ATOM_GEMV_TMA=0: pointer loads everywhere.

ATOM_GEMV_X_DESC_ROWS=16 takes x's tiles through a descriptor at 1-16 rows too. H200, two rounds
alternating in one lease: the 8B's decode step at batch 1 / 8 / 16 4.366 / 4.505 / 4.598 ms against
4.336 / 4.485 / 4.605, the 0.6B's 1.059 / 1.117 / 1.254 against 1.058 / 1.126 / 1.269 (RESULTS,
thirty-third sitting): slower on the 8B at 1-8 rows, faster on the 0.6B at 8-16, so the default
stays 32. Compiled for sm90, a K step of the 1-16-row kernel with x through pointers loads x
synchronously, stores it to shared memory and waits its wgmma out before the next step; with x
through a descriptor it waits on one barrier and leaves a wgmma in flight, x's tiles copied
stages ahead with the weight's. A program walks its K steps one after another (28 for the 8B's
down_proj), and anything a step waits on lengthens that chain (RESULTS, thirty-second sitting).

Two regimes:
- at most MAX_M rows: one row tile of BLOCK_M = max(16, rows) for tl.dot, streaming the weights
  at batch 1; a tile and a split of K per weight shape (`GemvConfig.split_k`: programs enough to
  keep every SM streaming where a shape has few output tiles) from the tuned table's bucket
  MAX_M, else `gemv_config`'s rule;
- up to MAX_TUNED_M rows: cuBLAS launches too few programs for a small model's weights at these
  counts (a Qwen3-0.6B GEMM of 128 rows is ~2 us of bytes and math, cuBLAS took ~6.5 us).
`benchmarks/bench_gemv.py --tune` times tiles against cuBLAS per weight shape and row bucket, as
CUDA graphs over weights that L2 does not hold, and `gemv_configs.json` keeps the tile where one
beat cuBLAS, else null: there F.linear runs (`linear_config`).
The torch reference (`gemv_ref`) is float32.

`gated`: SwiGLU's gate/up GEMM with its SiLU-and-mul fused in: the weight holds the gate rows,
then the up rows; a program reads a tile of each and writes silu(gate) * up, each sum first
rounded to y's dtype as the unfused GEMM's output is (reference: `gemv_silu_and_mul_ref`). Its
tiles: the table's "<N>x<K>+silu" entries where `bench_gemv.py --tune` timed gated launches
against the pair of kernels (null: the pair was faster), else the plain tile with its K halved
(`gated_tile`).

Fusing the RMSNorm or SiLU-and-mul before the GEMM into this kernel's prologue was measured and
dropped (eleventh sitting): their input loads feed arithmetic before the dot, which Triton does
not pipeline, and the fused kernels ran 1.1-2.2x slower than the pairs they replaced. Again for
the SiLU-and-mul on down_proj's input tiles (thirty-second sitting), with x's gate and up tiles
through pointer loads and then through descriptors pipelined with the weight's: each K step's
arithmetic lengthens a program's serial chain of K steps (28 for the 8B's down_proj), and the
8B's batch-1 step took 1.7-2.5% longer, the 0.6B's 4.9-5.6%, than with the SiLU kernel apart.
Reading a program's first weight tiles before its PDL wait (plain loads, or a bulk prefetch into
L2 of 2-64 KB a row, or of 256-512 bytes from the first wave only), while the kernel before it
runs, was measured and dropped too (eleventh and thirtieth sittings): slower, or no faster.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from atom.kernels.grid import cdiv, next_power_of_2
from atom.kernels.launch import INTERPRET, compiling_only, launch, pdl, pdl_start

MAX_M = 16  # rows in one tile: gemv_config's regime
MAX_TUNED_M = 256  # rows up to which the tuned table may pick a tile
TUNED_BUCKETS = (MAX_M, 32, 64, 128, 256)  # a row count takes the table's entry of the next one
TUNED_CONFIGS = Path(__file__).with_name("gemv_configs.json")
TUNED_CAPABILITY = (9, 0)  # what the table was tuned on (H100/H200: 228 KB of shared memory)
DESCRIPTORS_ENV = "ATOM_GEMV_TMA"  # 0: pointer loads of the weights everywhere
DESCRIPTORS = os.environ.get(DESCRIPTORS_ENV, "1") != "0"
MAX_DESC_BOX = 256  # a tensor descriptor's tile: at most 256 elements a side
X_DESC_ROWS_ENV = "ATOM_GEMV_X_DESC_ROWS"
X_DESC_ROWS = int(os.environ.get(X_DESC_ROWS_ENV, "32"))  # row tiles from which x's tiles come
# through a descriptor too (16: every row tile)


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4
    block_m: int = 0  # 0: all rows in one tile (at most MAX_M)
    split_k: int = 1  # programs per output tile, each over a share of K (the last adds them)
    descriptor: bool = True  # weight tiles through a tensor descriptor where the weight allows


def gemv_config(n: int, k: int) -> GemvConfig:
    """The tile for an [n, k] weight the table does not cover: what its sweep found best for the
    Llama-3.1-8B GEMMs at one row through descriptors (H200, 2026-11-30): 64 x 128 tiles, K split
    until ~256 programs stream (4 ways for 4096 outputs, 2 for 6144, none for 28672)."""
    return GemvConfig(64, 128, 4, 4, split_k=max(1, min(4, 256 // cdiv(n, 64))))


def row_bucket(rows: int) -> int:
    """The tuned table's bucket of a row count in [1, MAX_TUNED_M]."""
    return next(b for b in TUNED_BUCKETS if rows <= b)


GATED_SUFFIX = "+silu"  # the table's key of a gate/up weight's tiles for gated launches


def shape_key(n: int, k: int, gated: bool = False) -> str:
    """The table's key of an [n, k] weight; gated: its tiles for gated launches."""
    return f"{n}x{k}{GATED_SUFFIX if gated else ''}"


def gated_tile(cfg: GemvConfig) -> GemvConfig:
    """A plain tile of the [2n, k] gate/up weight made a gated one: two weight tiles a K step
    where the tile meant one, so half the K (the same bytes a stage and the shared memory it
    was tuned in: a 64 x 256 tile of four stages would take 270 KB gated, past an H100/H200's
    227 KB). Halving its outputs instead was 11% slower a step (RESULTS, thirty-first sitting)."""
    return dataclasses.replace(cfg, block_k=max(16, cfg.block_k // 2))


@functools.cache
def _tuned_table() -> dict[str, dict[int, GemvConfig | None]]:
    """Per weight shape and bucket, a tile, or None where cuBLAS won."""
    if not TUNED_CONFIGS.is_file():
        return {}
    shapes = json.loads(TUNED_CONFIGS.read_text())["shapes"]
    return {
        key: {int(b): None if cfg is None else GemvConfig(**cfg) for b, cfg in by_bucket.items()}
        for key, by_bucket in shapes.items()
    }


def _tuned(weight: Tensor, gated: bool = False) -> dict[int, GemvConfig | None]:
    """The table's buckets for this weight (gated: for its gated launches) where it applies
    (16-bit weights on the capability it was tuned on: a float32 tile or a smaller card's shared
    memory would not hold every tuned tile), else none."""
    if weight.element_size() != 2 or not weight.is_cuda:
        return {}
    table = _tuned_table().get(shape_key(*weight.shape, gated), {})
    if not table or _capability(weight.device.index) != TUNED_CAPABILITY:
        return {}
    return table


def linear_config(rows: int, weight: Tensor, gated: bool = False) -> GemvConfig | None:
    """gemv's tile for `rows` rows of this weight, or None for F.linear (cuBLAS): the tuned
    table's entry for the rows' bucket where it has one (None: cuBLAS won), else up to MAX_M
    rows gemv_config's rule, past it cuBLAS. gated: the tile of a gated launch, or None where
    the GEMM and SiLU-and-mul run apart: the table's gated entry where it has one (None: the
    pair won), else the plain choice made gated (`gated_tile`; gemv_config's rule for half the
    weight's rows)."""
    if 0 < rows <= MAX_TUNED_M:
        bucket = row_bucket(rows)
        if gated and bucket in (fused := _tuned(weight, gated=True)):
            return fused[bucket]
        if bucket in (table := _tuned(weight)):
            cfg = table[bucket]
            return gated_tile(cfg) if gated and cfg is not None else cfg
    if rows > MAX_M:
        return None
    if gated:
        return gated_tile(gemv_config(weight.shape[0] // 2, weight.shape[1]))
    return gemv_config(*weight.shape)


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def tuned_buckets(weight: Tensor, gated: bool = False) -> list[int]:
    """The buckets the table gives this weight a tile for (gated: a plain or a gated one; the
    precompile launches each)."""
    tables = [_tuned(weight), _tuned(weight, gated=True) if gated else {}]
    return [b for b in TUNED_BUCKETS if any(t.get(b) is not None for t in tables)]


def gemv_ref(x: Tensor, weight: Tensor) -> Tensor:
    return F.linear(x.float(), weight.float())


def gemv_silu_and_mul_ref(x: Tensor, weight: Tensor) -> Tensor:
    """gemv(x, weight, gated=True) in float32: SwiGLU over gate rows, then up rows."""
    gate, up = gemv_ref(x, weight).chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _output(acc, up, out_ty: tl.constexpr, GATED: tl.constexpr):
    """A tile of y from the float32 sums: acc, or (GATED) silu(acc) * up, each first rounded to
    y's dtype as the GEMM's output would be before silu_and_mul (its reference's arithmetic)."""
    if GATED:
        gate = acc.to(out_ty).to(tl.float32)
        acc = gate / (1.0 + tl.exp(-gate)) * up.to(out_ty).to(tl.float32)
    return acc.to(out_ty)


@triton.jit
def _tile_offsets(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows of x and outputs (program ids 0 and 1)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return offs_m, tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)


SCALE_PARTS = 64  # partial sums of squares a deferred norm's scale loads at a time (_row_rstd)
_SCALE_PARTS = tl.constexpr(SCALE_PARTS)  # the kernels' name for it


@triton.jit
def _row_rstd(ss_ptr, offs_m, M, parts, K, eps, BLOCK_P: tl.constexpr):
    """1/rms [BLOCK_M] of x's rows over their K features from their partial sums of squares
    (ss_ptr [M, parts] float32, kernels/gemv_norm.py): a deferred RMSNorm's scale. The parts
    are added in one order whatever wrote them first."""
    rows = offs_m[:, None].to(tl.int64) * parts
    total = tl.zeros([offs_m.shape[0]], dtype=tl.float32)
    for p0 in range(0, parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (offs_m < M)[:, None] & (p < parts)[None, :]
        total += tl.sum(tl.load(ss_ptr + rows + p[None, :], mask=ok, other=0.0), axis=1)
    return tl.rsqrt(total / K + eps)


@triton.jit
def _tile_sums(
    x, w, offs_m, offs_n, M, N, K, stride_xm, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    W_DESC: tl.constexpr, X_DESC: tl.constexpr, DOT_PRECISION: tl.constexpr, GATED: tl.constexpr,
):  # fmt: skip
    """This program's float32 sums [BLOCK_M, BLOCK_N] of its row tile, output tile
    (_tile_offsets) and split of K (program id 2), and (GATED) the up rows' sums (zeros
    otherwise)."""
    m_ok = offs_m < M
    n0 = tl.program_id(1) * BLOCK_N
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    # Split s of SPLIT_K sums K tiles [s * per, (s + 1) * per)
    per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = tl.program_id(2) * per
    k_end = tl.minimum(k_start + per, K)
    if not X_DESC:
        x_rows = x + offs_m[:, None].to(tl.int64) * stride_xm
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # GATED: the up rows' sums
    if W_DESC:
        # The weight tile through the tensor memory accelerator, as the dot's first operand
        # (y^T = W x^T: the weight rows are its M, the rows of x its N). Past N, M or K a
        # descriptor's copy reads zeros (a gate tile past N reads up rows: outputs never
        # stored); split ends are whole K tiles.
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        up_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        m0 = tl.program_id(0) * BLOCK_M
        for k0 in range(k_start, k_end, BLOCK_K):  # the compiler pipelines the loads
            if X_DESC:
                xt = x.load([m0, k0])
            else:
                kk = k0 + offs_k
                xt = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & (kk < k_end)[None, :],
                             other=0.0)  # fmt: skip
            acc_t = tl.dot(w.load([n0, k0]), tl.trans(xt), acc_t, input_precision=DOT_PRECISION)
            if GATED:
                up_t = tl.dot(w.load([N + n0, k0]), tl.trans(xt), up_t,
                              input_precision=DOT_PRECISION)  # fmt: skip
        acc = tl.trans(acc_t)
        if GATED:
            up = tl.trans(up_t)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        w_rows = w + offs_n[:, None].to(tl.int64) * stride_wn
        for k0 in range(k_start, k_end, BLOCK_K):  # the compiler pipelines the loads into the dot
            kk = k0 + offs_k
            k_ok = kk < k_end
            wt = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            xt = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PRECISION)
            if GATED:
                ut = tl.load(w_rows + N * stride_wn + kk[None, :],
                             mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
                up = tl.dot(xt, tl.trans(ut), up, input_precision=DOT_PRECISION)
    return acc, up


@triton.jit
def _add_splits(
    acc, up, offs_m, offs_n, ws_ptr, count_ptr, M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, GATED: tl.constexpr,
):  # fmt: skip
    """(acc, up, last): with SPLIT_K > 1 each split stores its partial sums and the last of a
    tile's splits to arrive adds them in split order (the same result whatever the arrival
    order), rearms the tile's counter and gets last = True with the whole sums; the others
    get last = False. Unsplit: the sums as they are, last = True."""
    if SPLIT_K == 1:
        return acc, up, True
    else:
        ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        width = 2 * N if GATED else N  # a row of the partial sums: gate then up (GATED)
        parts = ws_ptr + offs_m[:, None].to(tl.int64) * width + offs_n[None, :]
        mine = parts + tl.program_id(2).to(tl.int64) * M * width
        tl.store(mine, acc, mask=ok)
        if GATED:
            tl.store(mine + N, up, mask=ok)
        tl.debug_barrier()  # every thread's partial stored before the release below
        counter = count_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
        if last:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for split in range(SPLIT_K):
                part = parts + tl.full([], split, tl.int64) * M * width
                acc += tl.load(part, mask=ok, other=0.0, volatile=True)
                if GATED:
                    up += tl.load(part + N, mask=ok, other=0.0, volatile=True)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
        return acc, up, last


@triton.jit(do_not_specialize=["M", "parts"])
def _gemv_kernel(
    x,  # [M, K], last dim contiguous: a pointer, or (X_DESC) a descriptor of its tiles
    w,  # [N, K] ([2N, K] GATED), last dim contiguous: a pointer, or (W_DESC) a descriptor
    y_ptr,  # [M, N] contiguous
    ws_ptr,  # SPLIT_K > 1: [SPLIT_K, M, N] ([SPLIT_K, M, 2N] GATED) float32 partial sums
    count_ptr,  # SPLIT_K > 1: int32 per output tile, 0 between launches
    ss_ptr,  # ROW_SCALE: [M, parts] float32 partial sums of squares of x's rows before a norm
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    parts,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    W_DESC: tl.constexpr,
    X_DESC: tl.constexpr,  # only with W_DESC
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,
    GATED: tl.constexpr,  # y = silu(x W[:N]^T) * x W[N:]^T: SwiGLU's gate and up rows, fused
    ROW_SCALE: tl.constexpr,  # x is a deferred RMSNorm's rows: the sums times their 1/rms
):
    pdl_start(PDL)
    offs_m, offs_n = _tile_offsets(BLOCK_M, BLOCK_N)
    if ROW_SCALE:  # asked for before the K loop, used after it
        rstd = _row_rstd(ss_ptr, offs_m, M, parts, K, eps, _SCALE_PARTS)
    acc, up = _tile_sums(
        x, w, offs_m, offs_n, M, N, K, stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K,
        W_DESC, X_DESC, DOT_PRECISION, GATED,
    )  # fmt: skip
    acc, up, last = _add_splits(
        acc, up, offs_m, offs_n, ws_ptr, count_ptr, M, N, BLOCK_M, BLOCK_N, SPLIT_K, GATED
    )
    if last:
        if ROW_SCALE:
            acc = acc * rstd[:, None]
            up = up * rstd[:, None]
        tile = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(y_ptr + tile, _output(acc, up, y_ptr.dtype.element_ty, GATED), mask=ok)


def tile_descriptor(t: Tensor, rows: int, cols: int) -> TensorDescriptor | None:
    """A tensor descriptor of t's [rows, cols] tiles where the tensor memory accelerator can copy
    them (Hopper and later, or the interpreter; 16-byte aligned rows and tiles of at most
    MAX_DESC_BOX elements a side), else None: pointer loads."""
    if not DESCRIPTORS or max(rows, cols) > MAX_DESC_BOX or t.dim() != 2 or t.numel() == 0:
        return None
    if t.stride(-1) != 1 or t.stride(0) < t.shape[1]:  # rows of their own, elements contiguous
        return None
    if t.is_cuda:
        if torch.version.hip is not None or _capability(t.device.index)[0] < 9:
            return None
    elif not INTERPRET:
        return None
    if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
        return None
    return TensorDescriptor.from_tensor(t, [rows, cols])


_COUNTERS: dict[torch.device, Tensor] = {}
_OUTGROWN: list[Tensor] = []  # counters a captured CUDA graph may still point at: never freed


def _split_counters(device: torch.device, n: int) -> Tensor:
    """At least n zeroed int32 tile counters, one buffer per device that split-K launches share
    (each launch leaves its counters at 0; stream order keeps two launches apart). A buffer that
    grows stays allocated: graphs captured before point at it (the first buffer's 4096 counters
    serve any output of up to 4096 tiles)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        if counters is not None:
            _OUTGROWN.append(counters)
        counters = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


def split_buffers(
    split_k: int, m: int, width: int, tiles: int, unsplit: Tensor
) -> tuple[Tensor, Tensor]:
    """(float32 partial sums [split_k, m, width], zeroed int32 counters of `tiles` output tiles)
    of a launch that splits K; `unsplit` for both (unused pointers) where it does not; one-element
    stand-ins of the same pointer types in a compile-only launch (no kernel, no shared buffer)."""
    device = unsplit.device
    if split_k == 1:
        return unsplit, unsplit
    if compiling_only():
        stand_in = torch.empty(1, dtype=torch.float32, device=device)
        return stand_in, torch.empty(1, dtype=torch.int32, device=device)
    ws = torch.empty((split_k, m, width), dtype=torch.float32, device=device)
    return ws, _split_counters(device, tiles)


def tile_sizes(cfg: GemvConfig, m: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) of a launch of m rows and n outputs over k: the
    config's, clipped to the problem."""
    block_m = cfg.block_m or max(16, next_power_of_2(m))
    block_n = min(cfg.block_n, max(16, next_power_of_2(n)))
    block_k = min(cfg.block_k, max(16, next_power_of_2(k)))
    return block_m, block_n, block_k, max(1, min(cfg.split_k, cdiv(k, block_k)))


RowScale = tuple[Tensor, float]  # a deferred RMSNorm's (partial sums of squares [M, parts], eps)


def row_rstd_ref(row_scale: RowScale, k: int) -> Tensor:
    """1/rms [M, 1] float32 of rows of k features from a deferred norm's partial sums."""
    sumsq, eps = row_scale
    return torch.rsqrt(sumsq.float().sum(-1, keepdim=True) / k + eps)


def gemv(
    x: Tensor,
    weight: Tensor,
    config: GemvConfig | None = None,
    *,
    gated: bool = False,
    row_scale: RowScale | None = None,
) -> Tensor:
    """x [M, K] @ weight [N, K]^T -> [M, N] in x's dtype: M <= MAX_M with gemv_config's tile by
    default, any M with a config of block_m > 0. gated: weight [2N, K] holds SwiGLU's gate rows,
    then its up rows, and y = silu(x @ gate^T) * (x @ up^T) [M, N] (gemv_silu_and_mul_ref),
    each program reading a tile of both (the config's tiles each: linear_config's gated tile;
    by default gemv_config's made gated). row_scale: x holds a deferred RMSNorm's rows
    (kernels/gemv_norm.py) and each row's sums are multiplied by its 1/rms (row_rstd_ref)
    before they are rounded (and before the SiLU, gated)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit")
    if gated and weight.shape[0] % 2:
        raise ValueError(f"a gated weight has gate and up rows alike, got {weight.shape[0]} rows")
    (m, k), n = x.shape, weight.shape[0] // (2 if gated else 1)
    if m > MAX_M and (config is None or not config.block_m):
        raise ValueError(f"gemv takes at most {MAX_M} rows without a row tile, got {m}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x {x.dtype} and weight {weight.dtype} differ")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    cfg = config or (gated_tile(gemv_config(n, k)) if gated else gemv_config(n, k))
    block_m, block_n, block_k, split_k = tile_sizes(cfg, m, n, k)
    grid = (cdiv(m, block_m), cdiv(n, block_n), split_k)
    w_desc = tile_descriptor(weight, block_n, block_k) if cfg.descriptor else None
    # x's tiles too where the row tile is X_DESC_ROWS or more
    x_desc = None
    if w_desc is not None and block_m >= X_DESC_ROWS:
        x_desc = tile_descriptor(x, block_m, block_k)
    ws, counters = split_buffers(split_k, m, weight.shape[0], grid[0] * grid[1], y)
    sumsq, eps = row_scale if row_scale is not None else (ws, 0.0)  # unread without a scale
    if row_scale is not None and (
        sumsq.dim() != 2
        or sumsq.shape[0] != m
        or sumsq.dtype != torch.float32
        or not sumsq.is_contiguous()
    ):
        raise ValueError(f"row scale sums {tuple(sumsq.shape)} {sumsq.dtype}: want [{m}, parts] "
                         "contiguous float32")  # fmt: skip
    launch(
        _gemv_kernel, grid,
        x if x_desc is None else x_desc, weight if w_desc is None else w_desc, y, ws, counters,
        sumsq, m, n, k, x.stride(0), weight.stride(0), sumsq.shape[-1], eps,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        W_DESC=w_desc is not None, X_DESC=x_desc is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PDL=pdl(x), GATED=gated,
        ROW_SCALE=row_scale is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y
