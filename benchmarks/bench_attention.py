"""GPU micro-benchmark of the Triton unified attention kernel (atom/kernels/unified_attention.py).

    python benchmarks/bench_attention.py [out.json]      # default ./attention_bench.json

1. Prefill: dense causal batches over a paged cache (shuffled block ids) against
   torch SDPA's flash backend on contiguous K/V expanded to all query heads; ms and TFLOP/s
   (causal FLOPs = 2 * 2 * B * H * L^2 * D / 2).
2. Decode: one query token per sequence over contexts of 1k-32k tokens, bf16 and fp8 KV; ms and
   GB/s of KV bytes read (the kernel must read all of them once).

Each time is the median of 20 CUDA-event timings after warmup; L2 is flushed before each so that
a small decode batch does not read its KV from cache, and the host launch is kept out of the time.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from atom.kernels.attention_config import choose_num_splits, launch_config, num_sms
from atom.kernels.unified_attention import unified_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
PREFILL = [(4, 2048), (1, 8192)]  # (batch, tokens per sequence)
DECODE_BATCHES = [1, 8, 32, 128]
DECODE_CONTEXTS = [1024, 4096, 32768]
MAX_KV_BYTES = 20e9
WARMUP, REPEATS = 5, 20


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn over REPEATS runs, each after an L2 flush.

    A GPU busy-wait before each timed run lets the host enqueue the whole call ahead of the GPU,
    so the events time the kernels and not Python's launch overhead (CUDA graphs hide that in
    the engine).
    """
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    sleep = getattr(torch.cuda, "_sleep", lambda cycles: None)
    warm_start = time.perf_counter()
    for i in range(1000):  # warm until the clocks settle: at least WARMUP calls and 200 ms
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


def paged_inputs(batch: int, context: int, kv_dtype: torch.dtype) -> dict:
    """A cache holding exactly batch x context tokens, block ids shuffled across sequences."""
    blocks = -(-context // BLOCK)
    num_blocks = batch * blocks
    cache = torch.randn(
        2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda"
    )
    perm = torch.randperm(num_blocks, device="cuda", dtype=torch.int64)
    return {
        "kv_cache": cache.to(kv_dtype),
        "block_tables": perm.to(torch.int32).view(batch, blocks),
        "seq_lens": torch.full((batch,), context, dtype=torch.int32, device="cuda"),
    }


def bench_prefill(batch: int, length: int) -> dict:
    inp = paged_inputs(batch, length, torch.bfloat16)
    query = torch.randn(batch * length, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    qsl = torch.arange(0, batch * length + 1, length, dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)
    scale = HEAD_DIM**-0.5
    ours = bench(
        lambda: unified_attention(query, **inp, query_start_loc=qsl, max_query_len=length,
                                  max_seq_len=length, scale=scale, out=out)
    )  # fmt: skip
    # SDPA flash on dense [B, H, L, D]; GQA K/V expanded up front (not timed).
    q = query.view(batch, length, HEADS, HEAD_DIM).transpose(1, 2)
    k, v = (
        torch.randn(
            batch, KV_HEADS, length, HEAD_DIM, dtype=torch.bfloat16, device="cuda"
        ).repeat_interleave(HEADS // KV_HEADS, dim=1)
        for _ in range(2)
    )
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
    flops = 2 * 2 * batch * HEADS * length**2 * HEAD_DIM / 2
    return {
        "batch": batch,
        "length": length,
        "ms": ours,
        "tflops": flops / ours / 1e9,
        "sdpa_flash_ms": sdpa,
        "sdpa_flash_tflops": flops / sdpa / 1e9,
    }


def bench_decode(batch: int, context: int, kv_dtype: torch.dtype) -> dict | None:
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * kv_dtype.itemsize
    if kv_bytes > MAX_KV_BYTES:
        return None
    inp = paged_inputs(batch, context, kv_dtype)
    query = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)
    ms = bench(
        lambda: unified_attention(query, **inp, query_start_loc=qsl, max_query_len=1,
                                  max_seq_len=context, scale=HEAD_DIM**-0.5, out=out)
    )  # fmt: skip
    return {
        "batch": batch,
        "context": context,
        "kv_dtype": str(kv_dtype).removeprefix("torch."),
        "num_splits": choose_num_splits(batch, KV_HEADS, 1, context, num_sms(query.device)),
        "ms": ms,
        "kv_gb": kv_bytes / 1e9,
        "gb_per_s": kv_bytes / ms / 1e6,
    }


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "attention_bench.json"
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA GPU")
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    print(f"{device}, {num_sms(torch.device('cuda'))} SMs; H={HEADS} H_kv={KV_HEADS} D={HEAD_DIM}")
    print(f"prefill config: {launch_config(8192, HEADS // KV_HEADS, HEAD_DIM)}")
    print(f"decode config: {launch_config(1, HEADS // KV_HEADS, HEAD_DIM)}")

    prefill = [bench_prefill(b, n) for b, n in PREFILL]
    print("\nprefill (bf16, causal)    ours ms  TFLOP/s | SDPA flash ms  TFLOP/s")
    for r in prefill:
        print(
            f"  B={r['batch']:<3} L={r['length']:<6}      {r['ms']:8.3f} {r['tflops']:8.1f} |"
            f" {r['sdpa_flash_ms']:13.3f} {r['sdpa_flash_tflops']:8.1f}"
        )

    decode = []
    print("\ndecode  kv        B  context  splits       ms     GB/s")
    for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for batch in DECODE_BATCHES:
            for context in DECODE_CONTEXTS:
                r = bench_decode(batch, context, kv_dtype)
                torch.cuda.empty_cache()  # the next cache may be up to 20 GB
                if r is None:
                    continue
                decode.append(r)
                print(
                    f"        {r['kv_dtype']:<8} {batch:>3} {context:>8} {r['num_splits']:>7}"
                    f" {r['ms']:8.3f} {r['gb_per_s']:8.0f}"
                )

    result = {"device": device, "torch": torch.__version__, "prefill": prefill, "decode": decode}
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
