"""GPU micro-benchmark of the small-batch linear kernels (atom/kernels/gemv.py) against cuBLAS.

    python benchmarks/bench_gemv.py [out.json]      # default ./gemv_bench.json

The Llama-3.1-8B decode layer's four GEMMs (qkv 6144 x 4096, o 4096 x 4096, gate/up 28672 x 4096,
down 4096 x 14336; bf16) at 1, 4 and 8 rows: cuBLAS (F.linear) against gemv over a sweep of tiles
(batch 1; the best tile then serves 4 and 8 rows). Reported as GB/s of weight bytes (each GEMM
reads its weight once), beside the copy bandwidth of the same run; times as bench_attention.py
takes them (L2 flushed, median of 20).
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention  # the timing helper

from atom.kernels.gemv import GemvConfig, gemv

HIDDEN, INTER = 4096, 14336
SHAPES = {"qkv": (6144, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN),
          "down": (HIDDEN, INTER)}  # fmt: skip
ROWS = [1, 4, 8]
TILES = [GemvConfig(n, k, 4, s) for n, k, s in itertools.product([16, 32, 64], [128, 256, 512],
                                                                   [3, 4, 6])]  # fmt: skip


def copy_gbps() -> float:
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_attention.bench(lambda: dst.copy_(src)) / 1e6


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else "gemv_bench.json"
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
