"""Generate completions for a few chat prompts: `python -m atom.examples.simple_inference`.

With no --model it runs the embedded SmolLM2-135M-Instruct (GGUF) on the CPU, or on CUDA when
a GPU is present. Takes every engine flag (`--kv_cache_dtype`, `-tp`, `--enforce-eager`, ...).
"""

from __future__ import annotations

import argparse
import logging
import time

from atom import LLM, SamplingParams
from atom.args import EngineArgs, FlexibleArgumentParser


def reference_prompts() -> list[str]:
    """The reference example's prompt set: short questions and two long arithmetic strings."""
    return [
        "introduce yourself",
        "list all prime numbers within 100",
        "1+2+3=?",
        "如何在一个月内科学地减脂增肌？请给出训练和饮食建议。",
        "-".join(str(i) for i in range(1000)) + "=?",
        "-".join(str(i) for i in range(1500)) + "=?",
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = FlexibleArgumentParser(description=__doc__)
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--max-tokens", type=int, default=300)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    engine_args = EngineArgs.from_cli_args(args)
    prompts = reference_prompts()
    if engine_args.cudagraph_capture_sizes is None:  # as the reference: powers of two <= #prompts
        sizes = [1 << i for i in range(len(prompts).bit_length()) if 1 << i <= len(prompts)]
        engine_args = engine_args.replace(cudagraph_capture_sizes=sizes)
    start = time.perf_counter()
    llm = LLM(**vars(engine_args))
    print(f"engine ready in {time.perf_counter() - start:.1f} s")
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    profile = engine_args.torch_profiler_dir is not None  # as the reference: trace the run
    if profile:
        llm.start_profile()
    start = time.perf_counter()
    outputs = llm.chat(conversations, params)
    elapsed = time.perf_counter() - start
    if profile:
        llm.stop_profile()
    for out in outputs:
        print("\n")
        print(f"Prompt: {out.prompt!r}")
        print(f"Completion: {out.outputs[0].text!r}")
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(
        f"\n{len(outputs)} requests, {generated} tokens in {elapsed:.1f} s "
        f"({generated / elapsed:.1f} tok/s)"
    )


if __name__ == "__main__":
    main()
