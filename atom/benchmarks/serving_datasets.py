"""Prompts for the serving benchmark: `random` (vLLM's token-id prompts), `sharegpt` (a local
ShareGPT JSON file) and `custom` (a local JSONL file). Nothing is downloaded.

Each request is a text prompt, its length in tokens (by the benchmark's tokenizer) and the number
of tokens to ask for. Random numbers come from one `np.random.RandomState(seed)`, drawn in the
order vLLM's benchmark draws them from the global NumPy generator, so that a seed gives the same
random prompts as the reference with the same tokenizer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# vLLM re-encodes a decoded random prompt at most this often to reach the target length.
MAX_LENGTH_RETRIES = 10
# vLLM's ShareGPT filter: prompts and completions shorter than this are dropped ...
SHAREGPT_MIN_LEN = 4
# ... and so are prompts longer than this, or prompt + completion longer than the next.
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048

CUSTOM_SCHEMA = (
    'one JSON object per line: {"prompt": "<text>", "output_tokens": <int >= 1>}; '
    "output_tokens may be left out when --custom-output-len is given (which also overrides it)"
)


@dataclass(frozen=True, slots=True)
class BenchmarkRequest:
    prompt: str
    prompt_len: int  # tokens, as the benchmark's tokenizer counts them
    output_len: int  # max_tokens asked for


def sample_random(
    tokenizer: Any,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    prefix_len: int,
    rng: np.random.RandomState,
) -> list[BenchmarkRequest]:
    """vLLM's random dataset: a shared prefix of `prefix_len` random ids, then for prompt i the ids
    `(offset_i + i + j) % vocab` for j < its length; lengths are uniform in
    [int(len * range_ratio), len]. The ids are decoded to text and re-encoded until the length
    matches (up to 10 times: ids are appended at random or cut), as a server sees text."""
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1], got {range_ratio}")
    if input_len < 0 or prefix_len < 0 or prefix_len + input_len < 1:
        raise ValueError(
            f"--random-input-len ({input_len}) and --random-prefix-len ({prefix_len}) must be "
            ">= 0 and give prompts of at least one token"
        )
    if output_len < 1:
        raise ValueError(f"--random-output-len must be >= 1, got {output_len}")
    vocab = int(tokenizer.vocab_size)
    prefix = rng.randint(0, vocab, size=prefix_len).tolist()
    input_lens = rng.randint(int(input_len * range_ratio), input_len + 1, size=num_prompts)
    output_lens = rng.randint(int(output_len * range_ratio), output_len + 1, size=num_prompts)
    offsets = rng.randint(0, vocab, size=num_prompts)
    requests, mismatches = [], []
    for i in range(num_prompts):
        n = int(input_lens[i])
        ids = prefix + [int(offsets[i] + i + j) % vocab for j in range(n)]
        prompt = _fit_length(tokenizer, ids, prefix_len + n, rng)
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        mismatches.append(prompt_len - prefix_len - n)
        requests.append(BenchmarkRequest(prompt, prompt_len, max(int(output_lens[i]), 1)))
    print_length_stats(requests, float(np.mean(mismatches)))
    return requests


def _fit_length(tokenizer: Any, ids: list[int], target: int, rng: np.random.RandomState) -> str:
    prompt = tokenizer.decode(ids)
    for _ in range(MAX_LENGTH_RETRIES):
        ids = list(tokenizer.encode(prompt, add_special_tokens=False))
        if len(ids) < target:
            ids.extend(rng.randint(0, int(tokenizer.vocab_size), size=target - len(ids)).tolist())
        elif len(ids) > target:
            ids = ids[:target]
        else:
            break
        prompt = tokenizer.decode(ids)
    return prompt


def print_length_stats(requests: list[BenchmarkRequest], mismatch: float | None = None) -> None:
    header = f"{'-' * 19}  Input/Output Length Statistics  {'-' * 19}"
    ins = [r.prompt_len for r in requests]
    outs = [r.output_len for r in requests]
    extra = f"avg_token_mismatch={mismatch:<5.2f} " if mismatch is not None else ""
    print(header)
    print(
        f" input_lens : min={min(ins):<4d}  max={max(ins):<4d}  mean={np.mean(ins):<7.2f}  {extra}"
    )
    print(f" output_lens: min={min(outs):<4d}  max={max(outs):<4d}  mean={np.mean(outs):<7.2f} ")
    print("-" * len(header), "\n")


def sample_sharegpt(
    path: str | Path,
    tokenizer: Any,
    num_prompts: int,
    output_len: int | None,
    seed: int,
) -> list[BenchmarkRequest]:
    """vLLM's ShareGPT sampling: conversations with at least two turns, the first two turns as
    prompt and reference completion, shuffled with `seed`; pairs shorter than 4 tokens (the
    completion only when its length is used) or longer than 1024 prompt / 2048 total tokens are
    dropped. `output_len` replaces the completion's length."""
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    if output_len is not None and output_len < 1:
        raise ValueError(f"--sharegpt-output-len must be >= 1, got {output_len}")
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file holds a JSON list of conversations")
    pairs = [
        (d["conversations"][0]["value"], d["conversations"][1]["value"])
        for d in data
        if isinstance(d, dict) and len(d.get("conversations") or []) >= 2
    ]
    random.Random(seed).shuffle(pairs)  # the stream of random.seed(seed); random.shuffle
    requests = []
    for prompt, completion in pairs:
        if len(requests) == num_prompts:
            break
        prompt_len = len(tokenizer(prompt).input_ids)
        out_len = output_len if output_len is not None else len(tokenizer(completion).input_ids)
        if prompt_len < SHAREGPT_MIN_LEN or (output_len is None and out_len < SHAREGPT_MIN_LEN):
            continue
        if prompt_len > SHAREGPT_MAX_PROMPT_LEN or prompt_len + out_len > SHAREGPT_MAX_TOTAL_LEN:
            continue
        requests.append(BenchmarkRequest(prompt, prompt_len, out_len))
    if not requests:
        raise ValueError(f"{path}: no conversation passes the ShareGPT length filters")
    requests = _cycle(requests, num_prompts, str(path))
    print_length_stats(requests)
    return requests


def sample_custom(
    path: str | Path, tokenizer: Any, num_prompts: int, output_len: int | None
) -> list[BenchmarkRequest]:
    """The first `num_prompts` lines of a JSONL file (see CUSTOM_SCHEMA), in file order."""
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    if output_len is not None and output_len < 1:
        raise ValueError(f"--custom-output-len must be >= 1, got {output_len}")
    requests = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(requests) == num_prompts:
                break
            if not line.strip():
                continue
            item = json.loads(line)
            prompt = item.get("prompt") if isinstance(item, dict) else None
            if not isinstance(prompt, str):
                raise ValueError(f"{path}:{lineno}: expected {CUSTOM_SCHEMA}")
            out_len = output_len if output_len is not None else item.get("output_tokens")
            if not isinstance(out_len, int) or isinstance(out_len, bool) or out_len < 1:
                raise ValueError(
                    f"{path}:{lineno}: output_tokens={out_len!r}; expected {CUSTOM_SCHEMA}"
                )
            requests.append(BenchmarkRequest(prompt, len(tokenizer(prompt).input_ids), out_len))
    if not requests:
        raise ValueError(f"{path}: no request in the file; expected {CUSTOM_SCHEMA}")
    requests = _cycle(requests, num_prompts, str(path))
    print_length_stats(requests)
    return requests


def _cycle(requests: list[BenchmarkRequest], n: int, source: str) -> list[BenchmarkRequest]:
    """Too few requests: repeat them (as vLLM oversamples), loudly."""
    if len(requests) < n:
        print(f"WARNING: {source} gives {len(requests)} requests; repeating them to {n}")
        requests = [requests[i % len(requests)] for i in range(n)]
    return requests
