"""GPU micro-benchmark of sampling a token per row (atom/kernels/sampling.py).

    python benchmarks/bench_sampler.py [out.json]      # default ./sampler_bench.json

Qwen3's vocabulary (151,936), bf16 logits, batch 1 ... 256, temperature 0.6 (random rows) and 0
(greedy): the Sampler's fused Triton path (one read of the logits) against its torch path (float
copy, division, softmax, exponential noise, ratio, argmax), and plain `argmax` for greedy.
GB/s counts one read of the bf16 logits. Kernel time only: bench_attention's timing (L2 flushed,
the host ahead of the GPU).
"""

from __future__ import annotations

import json
import sys

import torch
from bench_attention import bench

from atom.executor.sampler import Sampler, SamplingMetadata

VOCAB = 151_936
BATCHES = [1, 8, 64, 256]


def _meta(temperature: torch.Tensor) -> SamplingMetadata:
    seeds = torch.arange(temperature.shape[0], device="cuda")
    return SamplingMetadata(temperature, bool((temperature == 0).all()), seeds=seeds)


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "sampler_bench.json"
    if not torch.cuda.is_available():
        sys.exit("bench_sampler needs a CUDA GPU")
    fused, torch_path = Sampler(), Sampler(fused=False)
    rows = []
    print("batch  mode     fused ms  torch ms  speed-up  fused GB/s")
    for batch in BATCHES:
        logits = torch.randn(batch, VOCAB, device="cuda", dtype=torch.bfloat16) * 3
        for mode, t in (("random", 0.6), ("greedy", 0.0)):
            meta = _meta(torch.full((batch,), t, device="cuda"))
            ours = bench(lambda: fused(logits, meta))  # noqa: B023
            ref = bench(lambda: torch_path(logits, meta))  # noqa: B023
            gbps = logits.numel() * logits.element_size() / ours / 1e6
            rows.append(
                {"batch": batch, "mode": mode, "fused_ms": ours, "torch_ms": ref, "GBps": gbps}
            )
            print(f"{batch:>5}  {mode:<7} {ours:9.3f} {ref:9.3f} {ref / ours:9.1f}x {gbps:10.0f}")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
