"""SamplingMetadata and request states for the sampler tests (torch and fused draws)."""

from __future__ import annotations

import torch

from atom.executor.input_batch import CachedRequestState
from atom.executor.sampler import SamplingMetadata
from atom.sampling_params import SamplingParams

CPU = torch.device("cpu")
VOCAB_OFF = 1 << 62  # build_sampling_metadata's top_k for rows without one


def make_meta(
    batch: int,
    temperature: float | list[float] = 1.0,
    top_k: list[int] | None = None,
    top_p: list[float] | None = None,
    min_p: list[float] | None = None,
    generators: dict[int, torch.Generator] | None = None,
    max_num_logprobs: int | None = None,
    blocked_tokens: list[tuple[int, list[int]]] | None = None,
) -> SamplingMetadata:
    temps = [temperature] * batch if isinstance(temperature, float) else temperature
    return SamplingMetadata(
        temperature=torch.tensor(temps, dtype=torch.float32),
        all_greedy=all(t == 0 for t in temps),
        top_k=None if top_k is None else torch.tensor(top_k, dtype=torch.int64),
        top_p=None if top_p is None else torch.tensor(top_p, dtype=torch.float32),
        min_p=None if min_p is None else torch.tensor(min_p, dtype=torch.float32),
        generators=generators or {},
        blocked_tokens=blocked_tokens or [],
        max_num_logprobs=max_num_logprobs,
    )


def make_state(
    req_id: str,
    params: SamplingParams,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    seed: int | None = None,
) -> CachedRequestState:
    gen = None if seed is None else torch.Generator(CPU).manual_seed(seed)
    return CachedRequestState(req_id, prompt or [0], output or [], params, [0], 0, gen)


def seeded(seeds: list[int]) -> dict[int, torch.Generator]:
    return {row: torch.Generator(CPU).manual_seed(s) for row, s in enumerate(seeds)}
