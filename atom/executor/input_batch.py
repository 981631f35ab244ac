"""The runner's view of live requests and the flat tensors of one step built from it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from atom.engine.outputs import SchedulerOutput
from atom.executor.forward_context import AttentionMetadata
from atom.executor.sampler import SamplingMetadata
from atom.sampling_params import SamplingParams


@dataclass(eq=False)
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]


@dataclass(slots=True)
class StepInputs:
    input_ids: Tensor  # [T]
    positions: Tensor  # [T]
    attn: AttentionMetadata
    req_ids: list[str]  # batch order
    logits_indices: Tensor  # [S] token index of each sampling row's last query token
    sample_rows: list[int]  # batch index of each sampling row
    prompt_logprob_spans: dict[int, tuple[int, int]] = field(default_factory=dict)


def build_step_inputs(
    sched: SchedulerOutput,
    states: dict[str, CachedRequestState],
    block_size: int,
    device: torch.device,
) -> StepInputs:
    req_ids = [r.req_id for r in sched.new_reqs] + [r.req_id for r in sched.cached_reqs]
    tokens: list[int] = []
    positions, slots = [], []
    seq_lens, qsl = [], [0]
    logits_indices, sample_rows = [], []
    spans: dict[int, tuple[int, int]] = {}
    for i, req_id in enumerate(req_ids):
        state = states[req_id]
        start, n = state.num_computed_tokens, sched.num_scheduled_tokens[req_id]
        end = start + n
        tokens += state.token_ids(start, end)
        pos = np.arange(start, end, dtype=np.int64)
        positions.append(pos)
        table = np.asarray(state.block_ids, dtype=np.int64)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        seq_lens.append(end)
        qsl.append(qsl[-1] + n)
        if state.sampling_params.prompt_logprobs is not None:
            last = min(end, len(state.prompt_token_ids) - 1)  # positions scoring prompt tokens
            if last > start:
                spans[i] = (qsl[-2], qsl[-2] + last - start)
        if end >= state.num_tokens:  # reached the end: this step yields a token
            logits_indices.append(qsl[-1] - 1)
            sample_rows.append(i)
    max_blocks = max(len(states[r].block_ids) for r in req_ids)
    tables = np.zeros((len(req_ids), max_blocks), dtype=np.int32)
    for i, req_id in enumerate(req_ids):
        ids = states[req_id].block_ids
        tables[i, : len(ids)] = ids

    def dev(a: np.ndarray | list[int], dtype: torch.dtype) -> Tensor:
        return torch.as_tensor(np.asarray(a), dtype=dtype).to(device, non_blocking=True)

    attn = AttentionMetadata(
        slot_mapping=dev(np.concatenate(slots), torch.int64),
        block_tables=dev(tables, torch.int32),
        seq_lens=dev(seq_lens, torch.int32),
        query_start_loc=dev(qsl, torch.int32),
        seq_lens_cpu=seq_lens,
        query_start_loc_cpu=qsl,
        max_query_len=max(b - a for a, b in itertools.pairwise(qsl)),
        max_seq_len=max(seq_lens),
    )
    return StepInputs(
        input_ids=dev(tokens, torch.int64),
        positions=dev(np.concatenate(positions), torch.int64),
        attn=attn,
        req_ids=req_ids,
        logits_indices=dev(logits_indices, torch.int64),
        sample_rows=sample_rows,
        prompt_logprob_spans=spans,
    )


def _positioned(state: CachedRequestState) -> torch.Generator:
    """The request's generator, seeded for the position of the token it is about to draw.

    A draw depends only on (seed, position), so preemption, recompute and batch composition
    change no sampled token.
    """
    assert state.generator is not None and state.sampling_params.seed is not None
    seed = position_seed(state.sampling_params.seed, len(state.output_token_ids))
    return state.generator.manual_seed(seed)


def position_seed(seed: int, position: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + position) % (1 << 63)


def build_sampling_metadata(
    rows: list[CachedRequestState], device: torch.device
) -> SamplingMetadata:
    params = [s.sampling_params for s in rows]

    def col(values: list[float], dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    vocab_off = 1 << 62
    needs_penalty = any(
        p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params
    )
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    blocked = [
        (i, sorted(p.all_stop_token_ids))
        for i, (p, s) in enumerate(zip(params, rows, strict=True))
        if len(s.output_token_ids) < p.min_tokens and p.all_stop_token_ids
    ]
    return SamplingMetadata(
        temperature=col([0.0 if p.greedy else p.temperature for p in params]),
        all_greedy=all(p.greedy for p in params),
        top_k=col([p.top_k or vocab_off for p in params], torch.int64)
        if any(p.top_k for p in params)
        else None,
        top_p=col([p.top_p for p in params]) if any(p.top_p < 1.0 for p in params) else None,
        min_p=col([p.min_p for p in params]) if any(p.min_p > 0 for p in params) else None,
        generators={i: _positioned(s) for i, s in enumerate(rows) if s.generator is not None},
        presence_penalty=col([p.presence_penalty for p in params]) if needs_penalty else None,
        frequency_penalty=col([p.frequency_penalty for p in params]) if needs_penalty else None,
        repetition_penalty=col([p.repetition_penalty for p in params]) if needs_penalty else None,
        output_token_ids=[s.output_token_ids for s in rows] if needs_penalty else [],
        prompt_token_ids=[s.prompt_token_ids for s in rows] if needs_penalty else [],
        blocked_tokens=blocked,
        max_num_logprobs=max(wanted) if wanted else None,
    )
