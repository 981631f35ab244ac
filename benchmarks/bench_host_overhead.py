"""The engine's host work per step, on any machine: `python benchmarks/bench_host_overhead.py`.

A GPU idles whenever the host's share of a step (scheduling, building the inputs, reading the
sampled ids back into requests, output processing) outlasts the step in flight (async
scheduling overlaps the two). This runs the offline engine on a one-layer model whose forward
is replaced by zero logits over a few ids (on a CPU a real one costs 100 times the host work and
makes the figures noisy), with the throughput benchmark's stand-in tokenizer, and times each
host phase with perf_counter wrappers: the numbers are the host's cost per step at the batch
sizes given, comparable between commits on one machine.

    python benchmarks/bench_host_overhead.py [--batch-sizes 1,16,64,256] [--steps 200]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

import atom.benchmarks.model_dirs as model_dirs
import atom.engine.output_processor as output_processor
import atom.engine.scheduler as scheduler
import atom.executor.model_runner as model_runner
from atom import LLM, SamplingParams

# What is timed: (owner, attribute); module-level functions are wrapped where the runner calls them.
PHASES = [
    (scheduler.Scheduler, "schedule"),
    (scheduler.Scheduler, "update_from_output"),
    (output_processor.OutputProcessor, "process"),
    (model_runner, "build_step_inputs"),
    (model_runner, "build_sampling_metadata"),
    (model_runner.ModelRunner, "_update_states"),
    (model_runner, "record_samples"),
    (model_runner.ModelRunner, "_forward"),
]
STUB_IDS = 64  # the stub forward's logits width
VOCAB = 151936  # Qwen3's: its stand-in tokenizer, as the throughput benchmark has


def _stub_forward(
    self: model_runner.ModelRunner, inputs: Any, graph: bool, sample: bool
) -> tuple[torch.Tensor | None, dict]:
    """Logits over STUB_IDS ids for each sampling row: greedy samples id STUB_IDS - 1 (the
    stand-in tokenizer's low ids are its special tokens)."""
    if not sample:
        return None, {}
    logits = torch.zeros(inputs.logits_indices.shape[0], STUB_IDS)
    logits[:, -1] = 1.0
    return logits, {}


def timed(fn: Callable[..., Any], name: str, totals: dict[str, float]) -> Callable[..., Any]:
    """fn, adding its wall time to totals[name] (profile_host.py uses it too)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    return wrapper


def tiny_checkpoint(path: str) -> None:
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    # The throughput benchmark's tokenizer (a stand-in of Qwen3's): detokenization is host work.
    spec = json.loads(
        (model_dirs.CONFIGS_DIR / "qwen3-0.6b" / model_dirs.TOKENIZER_SPEC).read_text()
    )
    model_dirs.write_stand_in_tokenizer(Path(path), spec, VOCAB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,16,64,256")
    parser.add_argument("--steps", type=int, default=200, help="decode tokens per sequence")
    parser.add_argument("--output-json")
    args = parser.parse_args()
    totals: dict[str, float] = collections.defaultdict(float)
    model_runner.ModelRunner._forward = _stub_forward  # type: ignore[method-assign]
    for owner, name in PHASES:
        setattr(owner, name, timed(getattr(owner, name), name, totals))
    rows = []
    with tempfile.TemporaryDirectory() as path:
        tiny_checkpoint(path)
        llm = LLM(path, load_format="dummy", dtype="float32", kv_cache_memory_bytes=1 << 28)
        params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=args.steps)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            prompts = [{"prompt_token_ids": [(7 * i + j) % VOCAB for j in range(32)]}
                       for i in range(batch)]  # fmt: skip
            llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm
            totals.clear()
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - start
            per_step = {k: 1e3 * v / args.steps for k, v in totals.items()}
            host = sum(v for k, v in per_step.items() if k != "_forward")
            rows.append({"batch": batch, "wall_ms_per_step": 1e3 * wall / args.steps,
                         "host_ms_per_step": host, **per_step})  # fmt: skip
            phases = ", ".join(f"{k} {v:.3f}" for k, v in per_step.items() if k != "_forward")
            print(f"batch {batch:4d}: host {host:.3f} ms/step ({phases}); "
                  f"forward {per_step.get('_forward', 0):.3f} ms")  # fmt: skip
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
