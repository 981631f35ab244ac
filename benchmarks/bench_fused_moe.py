"""GPU micro-benchmark of the sync-free fused MoE (atom/kernels/fused_moe.py).

    python benchmarks/bench_fused_moe.py [out.json]      # default ./fused_moe_bench.json

Qwen3-30B-A3B experts (H 2048, I 768, E 128, top-8, bf16) at T = 1 ... 512 tokens, against
  - the torch reference (atom.layers.moe.fused_experts: a loop over the experts hit, one sync),
  - the dense equivalent: the same FLOPs as two plain GEMMs on one expert's weights,
    [T*K, H] x [H, 2I] then [T*K, I] x [I, H] (a lower bound that reads one expert, not many).
GB/s counts the expert weights touched: distinct experts hit x bytes of one expert (w13 + w2);
decode is bound by them. TFLOP/s counts 2 * T*K * 3 * H * I.

Each time is the median of 20 CUDA-event timings after warmup; L2 is flushed before each, and a
GPU busy-wait lets the host enqueue the call ahead of the GPU, so launch overhead stays out.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from atom.kernels.fused_moe import _config, fused_experts
from atom.layers.moe import fused_experts as fused_experts_ref

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8
TOKENS = [1, 8, 32, 128, 512]
WARMUP, REPEATS = 5, 20


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn over REPEATS runs, each after an L2 flush."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    sleep = getattr(torch.cuda, "_sleep", lambda cycles: None)
    warm_start = time.perf_counter()
    for i in range(1000):  # at least WARMUP calls and 200 ms, until the clocks settle
        fn()
        if i >= WARMUP and time.perf_counter() - warm_start > 0.2:
            break
        torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        flush.zero_()
        sleep(1_000_000)  # ~0.5 ms at H200 clocks
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_tokens(num_tokens: int, w13: torch.Tensor, w2: torch.Tensor) -> dict:
    x = torch.randn(num_tokens, HIDDEN, dtype=torch.bfloat16, device="cuda")
    logits = torch.randn(num_tokens, EXPERTS, device="cuda")
    weights, ids = logits.softmax(-1).topk(TOP_K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    experts_hit = int(ids.unique().numel())  # host sync, outside the timing
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    weight_bytes = experts_hit * expert_bytes
    flops = 2 * num_tokens * TOP_K * 3 * HIDDEN * INTER

    ours = bench(lambda: fused_experts(x, w13, w2, weights, ids))
    ref = bench(lambda: fused_experts_ref(x, w13, w2, weights, ids))
    a = torch.randn(num_tokens * TOP_K, HIDDEN, dtype=torch.bfloat16, device="cuda")
    dense = bench(lambda: F.linear(F.linear(a, w13[0])[:, :INTER], w2[0]))
    err = (fused_experts(x, w13, w2, weights, ids).float() - fused_experts_ref(
        x.float(), w13.float(), w2.float(), weights, ids
    )).abs().max().item()  # fmt: skip
    return {
        "tokens": num_tokens,
        "experts_hit": experts_hit,
        "block_m": _config(num_tokens)["BLOCK_M"],
        "ms": ours,
        "weight_gb_per_s": weight_bytes / ours / 1e6,
        "tflops": flops / ours / 1e9,
        "ref_ms": ref,
        "dense_ms": dense,
        "dense_tflops": flops / dense / 1e9,
        "max_abs_err_vs_fp32_ref": err,
    }


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "fused_moe_bench.json"
    if not torch.cuda.is_available():
        sys.exit("bench_fused_moe needs a CUDA GPU")
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    # 1.2 GB of bf16 experts; the error check makes transient fp32 copies (2.4 GB)
    w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda") / HIDDEN**0.5).bfloat16()
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, device="cuda") / INTER**0.5).bfloat16()
    print(f"{device}; H={HIDDEN} I={INTER} E={EXPERTS} top-{TOP_K}, bf16")
    rows = []
    print("    T  hit  BM  ours ms  weight GB/s  TFLOP/s |   ref ms | dense ms  TFLOP/s |  err")
    for num_tokens in TOKENS:
        r = bench_tokens(num_tokens, w13, w2)
        rows.append(r)
        print(
            f"{num_tokens:>5} {r['experts_hit']:>4} {r['block_m']:>3} {r['ms']:8.3f}"
            f" {r['weight_gb_per_s']:12.0f} {r['tflops']:8.1f} | {r['ref_ms']:8.3f} |"
            f" {r['dense_ms']:8.3f} {r['dense_tflops']:8.1f} | {r['max_abs_err_vs_fp32_ref']:.1e}"
        )
        torch.cuda.empty_cache()
    result = {
        "device": device,
        "torch": torch.__version__,
        "shape": {"hidden": HIDDEN, "inter": INTER, "experts": EXPERTS, "top_k": TOP_K},
        "rows": rows,
    }
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
