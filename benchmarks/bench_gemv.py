"""GPU micro-benchmark and tuner of the small-batch linear kernel (atom/kernels/gemv.py).

    python benchmarks/bench_gemv.py [out.json]          # default ./gemv_bench.json
    python benchmarks/bench_gemv.py --tune [table.json] # default ./gemv_configs.json
    python benchmarks/bench_gemv.py --gated [out.json]  # default ./gemv_gated.json
    python benchmarks/bench_gemv.py --orientations [out.json]  # ./gemv_orientations.json

The Llama-3.1-8B decode layer's four GEMMs (qkv 6144 x 4096, o 4096 x 4096, gate/up 28672 x 4096,
down 4096 x 14336; bf16) at 1, 4 and 8 rows: cuBLAS (F.linear) against gemv over a sweep of tiles
(batch 1; the best tile then serves 4 and 8 rows). Reported as GB/s of weight bytes (each GEMM
reads its weight once), beside the copy bandwidth of the same run; times as bench_attention.py
takes them (L2 flushed, median of 20).

--tune times, for the decode GEMMs of Qwen3-0.6B and Llama-3.1-8B (also its -tp 2 shares; --models
picks) at each of gemv.TUNED_BUCKETS
rows (bucket 16: the mean of 1 and 16 rows, with splits of K), cuBLAS and every candidate tile as
CUDA graphs of one GEMM over each of enough copies of the weight that L2 holds none of them when
its turn comes (the engine's layers each read their own weights), launched without PDL: back to
back with PDL the GEMMs hid each other's start, which the engine's neighbours (a norm, attention)
do not, and a table tuned so lost 2-3% of the 8B's batch-1 step to the tiles picked without it
(RESULTS, twenty-ninth sitting). It writes the table gemv.py reads: per weight shape
and bucket, the fastest tile where it beat cuBLAS by at least TUNE_MARGIN, else null (copy it to
atom/kernels/gemv_configs.json), with both times. For each gate/up weight it then times gemv's
gated launch (SwiGLU's SiLU-and-mul fused in, ATOM_GEMV_SILU=1) over the same tiles and their
halves along K, against the pair the table now picks (the plain tile or cuBLAS, then the
SiLU-and-mul kernel): the "<N>x<K>+silu" entries, a tile where one beat the pair by
TUNE_MARGIN, else null (the pair runs). The gated tiles tried are each bucket's GATED_FROM
fastest plain tiles, as they are and halved along K. --silu-only tunes these entries alone, the
plain table kept.

--gated times the MLP's gate/up GEMM and SiLU-and-mul of each --tune shape set (the two models, the
8B's -tp 2 share) at 1, 8 and 16 rows where gemv runs the GEMM, with the tile linear_config
picks, as CUDA graphs over cold weight copies: the pair (gemv or cuBLAS, then the SiLU-and-mul
kernel) against gemv's gated launch (linear_ops.small_batch_linear_silu_and_mul with
ATOM_GEMV_SILU=1).
Launched without PDL, as --tune: back to back with PDL, each gated launch's programs waited on the
SMs the one before needed, and the 8B's took 84 us against 58 us plain, while in the engine (a
norm, then down-proj beside it) the step moved by 1% either way (RESULTS, thirty-first sitting).

--orientations times cuBLAS on the two models' decode GEMMs at ORIENTATION_ROWS rows in the four
ways its operands can lie, as CUDA graphs over cold weight copies: y = x W^T with W as the engine
stores it ([N, K], F.linear) or stored transposed ([K, N]), and y^T = W x^T from either (the
output transposed, for a consumer that reads it so). cuBLAS picks another kernel for each.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention  # the timing helper

from atom.kernels.gemv import (
    MAX_M,
    TUNED_BUCKETS,
    TUNED_CONFIGS,
    GemvConfig,
    gated_tile,
    gemv,
    gemv_config,
    linear_config,
    shape_key,
)
from atom.kernels.launch import plain_launches
from atom.kernels.linear_ops import small_batch_linear, small_batch_linear_silu_and_mul
from atom.kernels.silu_and_mul import silu_and_mul

HIDDEN, INTER = 4096, 14336
SHAPES = {"qkv": (6144, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN),
          "down": (HIDDEN, INTER)}  # fmt: skip
ROWS = [1, 4, 8]
TILES = [GemvConfig(n, k, 4, s) for n, k, s in itertools.product([32, 64, 128], [128, 256],
                                                                   [3, 4, 6])]  # fmt: skip
# --tune: (N, K) of the decode GEMMs of both benchmark models
TUNE_SHAPES = {
    "qwen3-0.6b": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024),
                   "down": (1024, 3072)},
    "llama-3.1-8b": SHAPES,
    # each rank's share at -tp 2 (column-parallel qkv / gate_up halve N, row-parallel o / down K)
    "llama-3.1-8b-tp2": {"qkv": (3072, HIDDEN), "o": (HIDDEN, HIDDEN // 2),
                         "gate_up": (INTER, HIDDEN), "down": (HIDDEN, INTER // 2)},
}  # fmt: skip
TUNE_MARGIN = 0.03  # a tile must beat cuBLAS (a gated one the pair) by this fraction to be kept
GATED_FROM = 6  # gated tiles tried per bucket: the fastest plain ones, as they are and K halved
COLD_BYTES = 192 << 20  # the weight copies of one timing: over 3x the H200's 60 MB of L2
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, split_k]) per row bucket; bucket 16 (rows
# 1-16: BLOCK_M 0, one tile of the rows) is timed at 1 and 16 rows, their mean
TUNE_TILES = {
    16: [(0, n, k, 4, 4, s) for n, k, s in itertools.product((32, 64, 128), (128, 256),
                                                             (1, 2, 4))],
    32: [(16, 32, 256, 4, 4), (16, 64, 256, 4, 4), (32, 32, 256, 4, 4), (32, 64, 128, 4, 4),
         (32, 64, 256, 4, 3), (32, 128, 128, 4, 3), (16, 16, 256, 4, 4)],
    64: [(32, 64, 128, 4, 4), (32, 32, 256, 4, 4), (64, 32, 256, 4, 3), (64, 64, 128, 4, 4),
         (64, 64, 256, 4, 3), (64, 128, 64, 4, 4), (64, 128, 128, 8, 3), (32, 128, 128, 4, 3)],
    128: [(64, 64, 128, 4, 4), (64, 32, 256, 4, 3), (64, 128, 64, 4, 4), (64, 128, 128, 8, 3),
          (128, 64, 64, 4, 4), (128, 64, 128, 8, 3), (128, 128, 64, 8, 4), (128, 32, 128, 4, 4)],
    256: [(64, 64, 128, 4, 4), (64, 128, 128, 8, 3), (128, 64, 64, 4, 4), (128, 64, 128, 8, 3),
          (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 32, 128, 4, 4)],
}  # fmt: skip
# Past 16 rows, weight tiles through descriptors as the dot's first operand and x's through
# descriptors too (gemv.py): every row in one tile up to 128 (each weight tile read once), or 64
# from 128 rows; weight tiles of 64 rows (one warpgroup) or 128 (two). Deep pipelines: at 128
# rows a program per SM streams its slab at (weight bytes in flight) / latency, and 3-4 stages
# of these tiles keep 24-64 KB in flight (~2.4-3.6 TB/s over the GPU at ~1.5 us; cuBLAS's 8B
# GEMMs at 128 rows read 2.4-3.6 TB/s, RESULTS thirtieth sitting); 6-8 stages of the smaller
# tiles keep up to 112 KB. A tile past shared memory is skipped (OutOfResources).
DESCRIPTOR_TILES = {
    bucket: [(bm, bn, bk, w, st)
             for bm in ((64, 128) if bucket >= 128 else (bucket,))
             for (bn, w), bk, st in itertools.product(((64, 4), (128, 8)), (64, 128), (3, 4, 6, 8))]
    for bucket in TUNED_BUCKETS if bucket > MAX_M
}  # fmt: skip


def copy_gbps() -> float:
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_attention.bench(lambda: dst.copy_(src)) / 1e6


def graph_us_per_gemm(fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> float:
    """Median microseconds of one GEMM in a CUDA graph of fn over every weight copy."""

    def run() -> None:
        for w in weights:
            fn(w)

    run()  # compile outside the capture
    torch.cuda.synchronize()
    ms = triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median")
    return 1e3 * ms / len(weights)


def cold_weights(n: int, k: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Copies of an [n, k] bf16 weight, enough (COLD_BYTES) that L2 holds none when its turn comes
    in graph_us_per_gemm."""
    copies = max(2, math.ceil(COLD_BYTES / (2 * n * k)))
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen).mul_(k**-0.5)
            for _ in range(copies)]  # fmt: skip


ORIENTATION_ROWS = (64, 128, 256)


def orientations(path: str) -> None:
    """cuBLAS per operand layout at 64-256 rows (module doc: --orientations)."""
    results: dict = {"copy_GBps": copy_gbps(), "us": {}}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for model in ("qwen3-0.6b", "llama-3.1-8b"):
        for name, (n, k) in TUNE_SHAPES[model].items():
            ws = cold_weights(n, k, gen)
            wts = [w.t().contiguous() for w in ws]  # [K, N]
            for rows in ORIENTATION_ROWS:
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
                xt = x.t().contiguous()
                us = {
                    "y = x W^T, W [N,K]": graph_us_per_gemm(lambda w, x=x: F.linear(x, w), ws),
                    "y = x W^T, W [K,N]": graph_us_per_gemm(lambda w, x=x: x @ w, wts),
                    "y^T = W x^T, W [N,K]": graph_us_per_gemm(lambda w, x=x: w @ x.t(), ws),
                    "y^T = W x^T, W [K,N]": graph_us_per_gemm(lambda w, xt=xt: w.t() @ xt, wts),
                }
                results["us"][f"{model} {name} {n}x{k} rows {rows}"] = us
                print(f"{model:12s} {name:7s} rows {rows:3d}: "
                      + ", ".join(f"{kind} {t:6.2f} us" for kind, t in us.items()),
                      flush=True)  # fmt: skip
            del ws, wts
    Path(path).write_text(json.dumps(results, indent=1))


GATED_SHAPES = {model: shapes["gate_up"] for model, shapes in TUNE_SHAPES.items()}
GATED_ROWS = (1, 8, 16)


def gated(path: str) -> None:
    """The gate/up GEMM and SiLU-and-mul, pair against fused (module doc: --gated)."""
    results: dict = {"device": torch.cuda.get_device_name(), "runs": []}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for model, (n, k) in GATED_SHAPES.items():
        weights = cold_weights(n, k, gen)
        for rows in GATED_ROWS:
            tile = linear_config(rows, weights[0], gated=True)
            if tile is None:  # the pair runs (gemv's plain tile or cuBLAS): nothing to compare
                what = "cuBLAS" if linear_config(rows, weights[0]) is None else "pair (table)"
                print(f"{model:>16} gate_up {n}x{k} rows {rows:>2}: {what}", flush=True)
                continue
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            pair = mean_us(lambda x, w: silu_and_mul(small_batch_linear(x, w, None)), [x], weights)
            fused = mean_us(small_batch_linear_silu_and_mul, [x], weights)
            print(f"{model:>16} gate_up {n}x{k} rows {rows:>2}: pair {pair:6.1f} us, fused "
                  f"{fused:6.1f} us ({pair / fused:4.2f}x) {tile}", flush=True)  # fmt: skip
            results["runs"].append({"model": model, "shape": shape_key(n, k), "rows": rows,
                                    "pair_us": pair, "fused_us": fused,
                                    "tile": str(tile)})  # fmt: skip
        del weights
        torch.cuda.empty_cache()
    Path(path).write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


def mean_us(
    fn: Callable[[torch.Tensor, torch.Tensor], object],
    xs: list[torch.Tensor],
    weights: list[torch.Tensor],
) -> float:
    """graph_us_per_gemm of fn(x, w), averaged over the inputs xs."""
    return sum(graph_us_per_gemm(lambda w, x=x: fn(x, w), weights) for x in xs) / len(xs)


def candidates(bucket: int, n: int, num_sms: int) -> list[GemvConfig]:
    """TUNE_TILES of the bucket (past 16 rows with pointer loads, as they were first tuned), and
    DESCRIPTOR_TILES; past 16 rows each tile split 2 and 4 ways along K where its output tiles
    are too few to give every SM two programs."""
    tiles = [GemvConfig(bn, bk, w, st, bm, *sp) for bm, bn, bk, w, st, *sp in TUNE_TILES[bucket]]
    if bucket > MAX_M:
        tiles = [dataclasses.replace(t, descriptor=False) for t in tiles]
        tiles += [GemvConfig(bn, bk, w, st, bm) for bm, bn, bk, w, st in DESCRIPTOR_TILES[bucket]]
        few = [t for t in tiles if math.ceil(n / t.block_n) * math.ceil(bucket / t.block_m)
               < 2 * num_sms]  # fmt: skip
        tiles += [dataclasses.replace(t, split_k=split) for t in few for split in (2, 4)]
    return tiles


def tune(
    path: str,
    buckets: tuple[int, ...] = TUNED_BUCKETS,
    models: tuple[str, ...] = (),
    silu_only: bool = False,
) -> None:
    """Writes the table to path; tuning only some buckets or models (all: ()), or only the
    gate/up weights' gated entries (silu_only), keeps the committed table's others."""
    table: dict = {
        "_comment": "bench_gemv.py --tune: per weight shape (N x K) and row bucket, the fastest "
        "tile where it beat cuBLAS, else null; per gate/up weight (N x K+silu), the fastest "
        "gated tile where it beat the GEMM and SiLU-and-mul, else null; timed as CUDA graphs "
        "over cold weights, bf16",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shapes": {},
        "timings_us": {},
    }
    if buckets != TUNED_BUCKETS or models or silu_only:
        kept = json.loads(TUNED_CONFIGS.read_text())
        table["shapes"], table["timings_us"] = kept["shapes"], kept["timings_us"]
        what = ",".join(models) if models else ""
        what += " buckets " + ",".join(map(str, buckets)) if buckets != TUNED_BUCKETS else ""
        what = f"{what} gated gate/up" if silu_only else what
        table["_comment"] = f"{kept['_comment']}; {what} re-tuned (--tune), {date.today()}"
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    for model, shapes in TUNE_SHAPES.items():
        if models and model not in models:
            continue
        for name, (n, k) in shapes.items():
            if silu_only and name != "gate_up":
                continue
            key = shape_key(n, k)
            fastest = {}  # per bucket, its inputs and the plain tiles gated launches start from
            weights = cold_weights(n, k, gen)
            table["shapes"].setdefault(key, {})
            table["timings_us"].setdefault(key, {})
            for bucket in buckets:
                xs = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
                      for rows in ((1, bucket) if bucket == MAX_M else (bucket,))]  # fmt: skip
                cublas = mean_us(F.linear, xs, weights)
                timed = []
                for cfg in candidates(bucket, n, num_sms):
                    try:
                        us = mean_us(lambda x, w, c=cfg: gemv(x, w, c), xs, weights)
                    except triton.runtime.errors.OutOfResources:
                        continue
                    timed.append((us, cfg))
                timed.sort(key=lambda t: t[0])
                fastest[bucket] = xs, [cfg for _, cfg in timed[:GATED_FROM]]
                us, best = timed[0]
                keep = us < (1 - TUNE_MARGIN) * cublas
                if not silu_only:  # else the committed plain entries stay (and run the pair)
                    table["shapes"][key][str(bucket)] = dataclasses.asdict(best) if keep else None
                    table["timings_us"][key][str(bucket)] = {"cublas": cublas, "best": us}
                verdict = "" if keep else " -> cuBLAS"
                verdict = " (not written: --silu-only)" if silu_only else verdict
                print(f"{model:>12} {name:>7} {key:>10} rows {bucket:>3}: cuBLAS {cublas:6.1f} us, "
                      f"best tile {us:6.1f} us ({cublas / us:4.2f}x) {best}{verdict}",
                      flush=True)  # fmt: skip
            if name == "gate_up":
                tune_gated(table, f"{model:>12} {name:>7}", weights, fastest)
            del weights
            torch.cuda.empty_cache()
            with open(path, "w") as f:  # after each shape: a cut-short run keeps what it found
                json.dump(table, f, indent=1)
    print(f"wrote {path}")


def tune_gated(
    table: dict,
    label: str,
    weights: list[torch.Tensor],
    fastest: dict[int, tuple[list[torch.Tensor], list[GemvConfig]]],
) -> None:
    """The gate/up weight's gated entries (module doc: --tune) after its plain ones, each
    bucket's on the inputs its plain tiles were timed on, from its fastest plain tiles
    (`fastest`) and the table's plain tile, as they are and halved along K (the table's
    halved: what a gated launch ran without an entry). The
    pair's GEMM runs the table's plain tile, as the engine would (gemv_config's rule where the
    table has none at 1-16 rows, cuBLAS where it says so)."""
    (n2, k), plain = weights[0].shape, table["shapes"][shape_key(*weights[0].shape)]
    key = shape_key(n2, k, gated=True)
    table["shapes"].setdefault(key, {})
    table["timings_us"].setdefault(key, {})
    for bucket, (xs, tiles) in fastest.items():
        if str(bucket) in plain:
            tile = plain[str(bucket)] and GemvConfig(**plain[str(bucket)])
        else:
            tile = gemv_config(n2, k) if bucket == MAX_M else None
        pair = mean_us(lambda x, w, t=tile: silu_and_mul(gemv(x, w, t) if t else F.linear(x, w)),
                       xs, weights)  # fmt: skip
        tiles = tiles + ([tile] if tile else [])
        timed = []
        for cfg in dict.fromkeys(tiles + [gated_tile(t) for t in tiles]):
            try:
                us = mean_us(lambda x, w, c=cfg: gemv(x, w, c, gated=True), xs, weights)
            except triton.runtime.errors.OutOfResources:
                continue
            timed.append((us, cfg))
        us, best = min(timed, key=lambda t: t[0])
        keep = us < (1 - TUNE_MARGIN) * pair
        table["shapes"][key][str(bucket)] = dataclasses.asdict(best) if keep else None
        table["timings_us"][key][str(bucket)] = {"pair": pair, "best": us}
        print(f"{label} {key:>10} rows {bucket:>3}: pair {pair:6.1f} us, best gated tile "
              f"{us:6.1f} us ({pair / us:4.2f}x) {best}{'' if keep else ' -> pair'}",
              flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?")
    parser.add_argument("--tune", action="store_true", help="sweep tiles, write the table")
    parser.add_argument("--buckets", help="--tune: these buckets only (e.g. 32,64), the others "
                        "kept from the committed table")  # fmt: skip
    parser.add_argument("--models", help=f"--tune: these of {', '.join(TUNE_SHAPES)} only, the "
                        "other shapes kept from the committed table")  # fmt: skip
    parser.add_argument("--silu-only", action="store_true", help="--tune: only the gate/up "
                        "weights' gated entries (SiLU fused), the plain ones kept")  # fmt: skip
    parser.add_argument("--gated", action="store_true", help="gate/up + SiLU: pair vs fused")
    parser.add_argument("--orientations", action="store_true", help="cuBLAS per operand layout")
    args = parser.parse_args()
    if args.orientations:
        orientations(args.out or "gemv_orientations.json")
        return
    if args.gated:
        with plain_launches():
            gated(args.out or "gemv_gated.json")
        return
    if args.tune:
        buckets = tuple(int(b) for b in args.buckets.split(",")) if args.buckets else None
        if buckets and not set(buckets) <= set(TUNED_BUCKETS):
            parser.error(f"--buckets: each of {TUNED_BUCKETS}")
        models = tuple(args.models.split(",")) if args.models else ()
        if not set(models) <= set(TUNE_SHAPES):
            parser.error(f"--models: each of {', '.join(TUNE_SHAPES)}")
        with plain_launches():
            tune(args.out or "gemv_configs.json", buckets or TUNED_BUCKETS, models, args.silu_only)
        return
    out_path = args.out or "gemv_bench.json"
    results: dict = {"copy_GBps": copy_gbps(), "runs": []}
    print(f"copy bandwidth {results['copy_GBps']:.0f} GB/s", flush=True)

    def record(name: str, rows: int, kind: str, ms: float, nbytes: int, tile: str = "") -> None:
        gbps = nbytes / ms / 1e6
        print(f"{name:8s} rows {rows} {kind:24s} {ms * 1e3:8.1f} us {gbps:6.0f} GB/s {tile}",
              flush=True)  # fmt: skip
        results["runs"].append({"gemm": name, "rows": rows, "kind": kind, "us": ms * 1e3,
                                "gb_per_s": gbps, "tile": tile})  # fmt: skip

    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in SHAPES.items():
        bench_shape(name, n, k, gen, record)
    Path(out_path).write_text(json.dumps(results, indent=1))


def bench_shape(
    name: str, n: int, k: int, gen: torch.Generator, record: Callable[..., None]
) -> None:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * k**-0.5
    nbytes = w.numel() * w.element_size()
    x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    timed = {}
    for tile in TILES:
        try:
            timed[tile] = bench_attention.bench(lambda tile=tile: gemv(x1, w, tile))
        except Exception as e:  # a tile that does not fit in shared memory, say
            print(f"{name} {tile}: {type(e).__name__}", flush=True)
    best = min(timed, key=timed.__getitem__)
    print(f"{name}: batch-1 tiles from {min(timed.values()) * 1e3:.1f} to "
          f"{max(timed.values()) * 1e3:.1f} us; best {best}", flush=True)  # fmt: skip
    for rows in ROWS:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        record(name, rows, "cuBLAS", bench_attention.bench(lambda x=x: F.linear(x, w)), nbytes)
        record(name, rows, "gemv", bench_attention.bench(lambda x=x: gemv(x, w, best)), nbytes,
               str(best))  # fmt: skip


if __name__ == "__main__":
    main()
