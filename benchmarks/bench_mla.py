"""GPU micro-benchmark of the Triton MLA kernel (atom/kernels/mla_attention.py) at DeepSeek's
shape: kv_lora_rank 512, rope 64, 16 heads (V2-Lite, V3 at TP 8) and 128 heads (V3 at TP 1).

    python benchmarks/bench_mla.py [out.json]      # default ./mla_bench.json

1. Decode: one query row per sequence over 1k-32k latents, bf16 and fp8 cache; ms and GB/s of
   latent bytes read (each must be read once), for the kernel alone and for the layer's whole
   absorbed path (W_UK and W_UV GEMMs included).
2. Prefill: causal prompts through the absorbed kernel against SDPA flash on the expanded K/V
   (q/k 192 wide, v 128), the alternative for prefill rows; ms and TFLOP/s of the absorbed form
   (2 * (576 + 512) per head, query and visible key).

Timing: bench() of bench_attention.py (median of CUDA-event timings after an L2 flush).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from bench_attention import bench
from torch.nn.attention import SDPBackend, sdpa_kernel

from atom.kernels.attention_config import choose_num_splits, num_sms
from atom.kernels.mla_attention import mla_latent_attention, mla_launch_config, mla_paged_attention

RANK, ROPE, NOPE, V_DIM, BLOCK = 512, 64, 128, 128, 16
SCALE = (NOPE + ROPE) ** -0.5
HEADS = [16, 128]
DECODE_BATCHES = [1, 8, 32, 128]
DECODE_CONTEXTS = [1024, 4096, 32768]
PREFILL = [(4, 2048), (1, 8192)]  # (batch, tokens per sequence)
MAX_CACHE_BYTES = 20e9


def paged(batch: int, context: int, kv_dtype: torch.dtype) -> dict:
    """A latent cache holding exactly batch x context tokens, block ids shuffled."""
    blocks = -(-context // BLOCK)
    cache = torch.randn(1, batch * blocks, BLOCK, 1, RANK + ROPE, device="cuda").to(kv_dtype)
    perm = torch.randperm(batch * blocks, device="cuda")
    return {
        "kv_cache": cache,
        "block_tables": perm.to(torch.int32).view(batch, blocks),
        "seq_lens": torch.full((batch,), context, dtype=torch.int32, device="cuda"),
    }


def bench_decode(heads: int, batch: int, context: int, kv_dtype: torch.dtype) -> dict | None:
    latent_bytes = batch * context * (RANK + ROPE) * kv_dtype.itemsize
    if latent_bytes > MAX_CACHE_BYTES:
        return None
    inp = paged(batch, context, kv_dtype)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    q_lat = torch.randn(batch, heads, RANK, device="cuda").bfloat16()
    q_pe = torch.randn(batch, heads, ROPE, device="cuda").bfloat16()
    q = torch.randn(batch, heads, NOPE + ROPE, device="cuda").bfloat16()
    w_kv_b = (torch.randn(heads * (NOPE + V_DIM), RANK, device="cuda") * RANK**-0.5).bfloat16()
    common = (inp["block_tables"], inp["seq_lens"], qsl, 1, context)
    kernel = bench(
        lambda: mla_latent_attention(q_lat, q_pe, inp["kv_cache"], *common, SCALE)
    )  # fmt: skip
    layer = bench(
        lambda: mla_paged_attention(q, inp["kv_cache"], *common, w_kv_b, NOPE, V_DIM, SCALE)
    )  # fmt: skip
    groups = mla_launch_config(1, heads).num_head_groups
    return {
        "heads": heads,
        "batch": batch,
        "context": context,
        "kv_dtype": str(kv_dtype).removeprefix("torch."),
        "num_splits": choose_num_splits(batch, groups, 1, context, num_sms(q.device)),
        "kernel_ms": kernel,
        "layer_ms": layer,
        "latent_gb": latent_bytes / 1e9,
        "kernel_gb_per_s": latent_bytes / kernel / 1e6,
    }


def bench_prefill(heads: int, batch: int, length: int) -> dict:
    inp = paged(batch, length, torch.bfloat16)
    tokens = batch * length
    qsl = torch.arange(0, tokens + 1, length, dtype=torch.int32, device="cuda")
    q_lat = torch.randn(tokens, heads, RANK, device="cuda").bfloat16()
    q_pe = torch.randn(tokens, heads, ROPE, device="cuda").bfloat16()
    ours = bench(
        lambda: mla_latent_attention(q_lat, q_pe, inp["kv_cache"], inp["block_tables"],
                                     inp["seq_lens"], qsl, length, length, SCALE)
    )  # fmt: skip
    q, k = (torch.randn(batch, heads, length, NOPE + ROPE, device="cuda").bfloat16() for _ in "qk")
    # Flash attention wants V's head dim equal to Q/K's (192 here, V has 128): V padded with
    # zeros, as vLLM does for MLA prefill through FlashAttention; the output is sliced back.
    v = torch.randn(batch, heads, length, NOPE + ROPE, device="cuda").bfloat16()
    v[..., V_DIM:] = 0
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        expanded = bench(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)[..., :V_DIM]
        )
    pairs = batch * heads * length * (length + 1) / 2
    return {
        "heads": heads,
        "batch": batch,
        "length": length,
        "absorbed_ms": ours,
        "absorbed_tflops": 2 * (RANK + ROPE + RANK) * pairs / ours / 1e9,
        "expanded_sdpa_flash_ms": expanded,
    }


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "mla_bench.json"
    if not torch.cuda.is_available():
        sys.exit("bench_mla needs a CUDA GPU")
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    print(f"{device}, {num_sms(torch.device('cuda'))} SMs; rank {RANK}, rope {ROPE}")
    decode = []
    print("\ndecode  heads kv         B  context  splits  kernel ms  GB/s  layer ms")
    for heads in HEADS:
        for kv_dtype in (torch.bfloat16, torch.float8_e4m3fn):
            for batch in DECODE_BATCHES:
                for context in DECODE_CONTEXTS:
                    r = bench_decode(heads, batch, context, kv_dtype)
                    torch.cuda.empty_cache()
                    if r is None:
                        continue
                    decode.append(r)
                    print(
                        f"        {heads:>5} {r['kv_dtype']:<8} {batch:>3} {context:>8}"
                        f" {r['num_splits']:>7} {r['kernel_ms']:10.3f} {r['kernel_gb_per_s']:5.0f}"
                        f" {r['layer_ms']:9.3f}"
                    )
    prefill = [bench_prefill(h, b, n) for h in HEADS for b, n in PREFILL]
    print("\nprefill (bf16, causal)   absorbed ms  TFLOP/s | expanded SDPA flash ms")
    for r in prefill:
        print(
            f"  H={r['heads']:<3} B={r['batch']:<2} L={r['length']:<5}   {r['absorbed_ms']:11.3f}"
            f" {r['absorbed_tflops']:8.1f} | {r['expanded_sdpa_flash_ms']:10.3f}"
        )
    result = {"device": device, "torch": torch.__version__, "decode": decode, "prefill": prefill}
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
