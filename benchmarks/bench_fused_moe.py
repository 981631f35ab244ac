"""GPU micro-benchmark and tuner of the sync-free fused MoE (atom/kernels/fused_moe.py).

    python benchmarks/bench_fused_moe.py [out.json]          # default ./fused_moe_bench.json
    python benchmarks/bench_fused_moe.py --tune [table.json] # default ./fused_moe_configs.json

The expert shapes of Qwen3-30B-A3B (H 2048, I 768, E 128, top-8), DeepSeek-V2-Lite (2048, 1408,
64, top-6) and gpt-oss-20b (2880, 2880, 32, top-4), bf16, random routing, T = 1 ... 8192 tokens.

--tune times every candidate tile configuration per shape and token count as a CUDA graph (the
engine replays decode steps as graphs, so launch overhead stays out) and writes the fastest as
the table atom/kernels/fused_moe.py reads (copy it to atom/kernels/fused_moe_configs.json).

The benchmark times the selected configuration against
  - the torch reference (atom.layers.moe.fused_experts: a loop over the experts hit, one sync),
  - the dense equivalent: the same FLOPs as two plain GEMMs on one expert's weights,
    [T*K, H] x [H, 2I] then [T*K, I] x [I, H] (a bound that reads one expert, not many),
  - the weight roofline: the distinct experts hit x one expert's bytes over the copy bandwidth
    measured here (decode is bound by those bytes).
TFLOP/s counts 2 * T*K * 3 * H * I. Times are bench_attention's (L2 flushed, host ahead).
"""

from __future__ import annotations

import argparse
import itertools
import json
from typing import Any

import torch
import torch.nn.functional as F
import triton
from bench_attention import bench

from atom.benchmarks.roofline import measure_copy_bandwidth
from atom.kernels.fused_moe import fused_experts, select_config, shape_key
from atom.layers.moe import fused_experts as fused_experts_ref

# name: (hidden, inter, experts, top_k)
SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
    "gpt-oss-20b": (2880, 2880, 32, 4),
}
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 8192]
BENCH_TOKENS = [1, 8, 32, 128, 512, 2048]
# (BLOCK_M, BLOCK_N, BLOCK_K) candidates, each with num_stages 3/4 and num_warps 4 (and 8 for
# tiles of more than 64 x 64)
TILES = [
    (16, 32, 128), (16, 64, 64), (16, 64, 128), (16, 128, 64), (16, 128, 128),
    (32, 64, 64), (32, 64, 128), (32, 128, 64),
    (64, 64, 64), (64, 128, 64), (64, 128, 128),
    (128, 64, 64), (128, 128, 64),
]  # fmt: skip


def expert_weights(hidden: int, inter: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16)
    return w13.mul_(hidden**-0.5), w2.mul_(inter**-0.5)


def routed_inputs(
    num_tokens: int, hidden: int, experts: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(num_tokens, hidden, dtype=torch.bfloat16, device="cuda")
    logits = torch.randn(num_tokens, experts, device="cuda")
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    return x, weights / weights.sum(-1, keepdim=True), ids


def candidates(num_tokens: int, experts: int, top_k: int) -> list[dict[str, int]]:
    """Tiles whose M fits the rows an expert gets (at most twice the next power of two)."""
    rows = num_tokens * top_k / experts
    max_m = max(16, 2 * triton.next_power_of_2(max(1, round(rows))))
    return [
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": w, "num_stages": s}
        for (m, n, k), w, s in itertools.product(TILES, (4, 8), (3, 4))
        if m <= max_m and (w == 4 or m * n > 64 * 64)
    ]


def graph_ms(fn: Any) -> float:
    """Median milliseconds of fn replayed as a CUDA graph."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def tune_shape(name: str) -> dict[str, dict[str, int]]:
    """The fastest candidate per token count for one model's expert shape."""
    hidden, inter, experts, top_k = SHAPES[name]
    w13, w2 = expert_weights(hidden, inter, experts)
    best_by_tokens: dict[str, dict[str, int]] = {}
    for num_tokens in TOKENS:
        x, weights, ids = routed_inputs(num_tokens, hidden, experts, top_k)

        def run(cfg: dict[str, int] | None = None) -> torch.Tensor:
            return fused_experts(x, w13, w2, weights, ids, config=cfg)  # noqa: B023

        timed = []
        for cfg in candidates(num_tokens, experts, top_k):
            try:
                timed.append((graph_ms(lambda c=cfg: run(c)), cfg))
            except triton.runtime.errors.OutOfResources:
                continue  # too much shared memory for this tile and stage count
        if not timed:
            raise RuntimeError(f"{name} T={num_tokens}: no candidate fits this card")
        ms, best = min(timed, key=lambda t: t[0])
        current = graph_ms(run)
        print(
            f"{name:>17} T={num_tokens:>5}: {ms * 1e3:8.1f} us {best} "
            f"({len(timed)} tried; current table {current * 1e3:.1f} us)",
            flush=True,
        )
        best_by_tokens[str(num_tokens)] = best
    return best_by_tokens


def tune(path: str, names: list[str]) -> None:
    table: dict[str, Any] = {
        "_comment": "bench_fused_moe.py --tune: the fastest tiles per expert shape and token "
        "count, bf16, timed as CUDA graphs",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shapes": {},
    }
    for name in names:
        hidden, inter, experts, top_k = SHAPES[name]
        table["shapes"][shape_key(experts, inter, hidden, top_k)] = tune_shape(name)
        torch.cuda.empty_cache()
        with open(path, "w") as f:  # after each shape: a cut-short run keeps what it found
            json.dump(table, f, indent=1)
        print(f"wrote {path}")


def bench_shape(
    name: str, hidden: int, inter: int, experts: int, top_k: int, bandwidth: float
) -> list[dict[str, Any]]:
    w13, w2 = expert_weights(hidden, inter, experts)
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    rows = []
    for num_tokens in BENCH_TOKENS:
        x, weights, ids = routed_inputs(num_tokens, hidden, experts, top_k)
        hit = int(ids.unique().numel())  # host sync, outside the timing
        flops = 2 * num_tokens * top_k * 3 * hidden * inter
        ours = bench(lambda: fused_experts(x, w13, w2, weights, ids))  # noqa: B023
        graph = graph_ms(lambda: fused_experts(x, w13, w2, weights, ids))  # noqa: B023
        ref = bench(lambda: fused_experts_ref(x, w13, w2, weights, ids))  # noqa: B023
        a = torch.randn(num_tokens * top_k, hidden, dtype=torch.bfloat16, device="cuda")
        dense = bench(lambda: F.linear(F.linear(a, w13[0])[:, :inter], w2[0]))  # noqa: B023
        err = (fused_experts(x, w13, w2, weights, ids).float() - fused_experts_ref(
            x.float(), w13.float(), w2.float(), weights, ids
        )).abs().max().item()  # fmt: skip
        roofline_ms = hit * expert_bytes / bandwidth * 1e3
        row = {
            "model": name,
            "tokens": num_tokens,
            "experts_hit": hit,
            "config": select_config(num_tokens, experts, inter, hidden, top_k, x.dtype),
            "ms": ours,
            "graph_ms": graph,
            "weight_GBps": hit * expert_bytes / ours / 1e6,
            "roofline_ms": roofline_ms,
            "roofline_pct": 100 * roofline_ms / ours,
            "tflops": flops / ours / 1e9,
            "ref_ms": ref,
            "dense_ms": dense,
            "dense_tflops": flops / dense / 1e9,
            "max_abs_err_vs_fp32_ref": err,
        }
        rows.append(row)
        print(
            f"{name:>17} {num_tokens:>5} {hit:>4} {row['config']['BLOCK_M']:>3} {ours:8.3f}"
            f" {graph:8.3f} {row['weight_GBps']:8.0f} {row['roofline_pct']:6.1f}%"
            f" {row['tflops']:7.1f} | {ref:8.3f} | {dense:8.3f} {row['dense_tflops']:7.1f}"
            f" | {err:.1e}",
            flush=True,
        )
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="output JSON")
    parser.add_argument("--tune", action="store_true", help="sweep tiles, write the table")
    parser.add_argument(
        "--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_moe needs a CUDA GPU")
    torch.manual_seed(0)
    if args.tune:
        tune(args.out or "fused_moe_configs.json", args.shapes.split(","))
        return
    bandwidth = measure_copy_bandwidth("cuda")
    device = torch.cuda.get_device_name()
    print(f"{device}, bf16, copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(
        "            model     T  hit  BM  ours ms graph ms     GB/s  roofl  TFLOP/s |   ref ms |"
        " dense ms TFLOP/s |  err"
    )
    names = args.shapes.split(",")
    rows = [r for name in names for r in bench_shape(name, *SHAPES[name], bandwidth)]
    result = {
        "device": device,
        "torch": torch.__version__,
        "copy_GBps": bandwidth / 1e9,
        "shapes": SHAPES,
        "rows": rows,
    }
    path = args.out or "fused_moe_bench.json"
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
