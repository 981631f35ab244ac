"""Token sampling on the device: penalties, temperature, top-k/top-p/min-p, seeded noise, logprobs.

Random sampling is the exponential race: argmax(p / E) with E ~ Exp(1) picks token i with
probability p_i. On CUDA it runs in log space as one Triton pass (atom.kernels.sampling: Gumbel
noise from Philox keyed by each row's seed), on the filtered logits when a filter or penalty is
on, else straight on the model's logits; on the CPU each seeded request draws E from its own
torch generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from atom.engine.outputs import TokenLogprobs
from atom.kernels.sampling import gumbel_argmax

if TYPE_CHECKING:  # input_batch imports this module
    from atom.executor.input_batch import CachedRequestState, StepInputs

PROMPT_LOGPROBS_ROWS = 512  # positions scored at a time: a full-vocabulary softmax is large


@dataclass(slots=True)
class SamplingMetadata:
    """One step's sampling parameters, a row per sampled sequence; every feature is off by
    default (temperature alone)."""

    temperature: Tensor  # [B] float32; rows with 0 are greedy
    all_greedy: bool
    top_k: Tensor | None = None  # [B] int64, vocab size = off
    top_p: Tensor | None = None  # [B] float32
    min_p: Tensor | None = None  # [B] float32
    # row -> the request's own generator (CPU)
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    presence_penalty: Tensor | None = None  # [B]; the three penalties are all set or all None
    frequency_penalty: Tensor | None = None
    repetition_penalty: Tensor | None = None
    output_token_ids: list[list[int]] = field(default_factory=list)
    prompt_token_ids: list[list[int]] = field(default_factory=list)
    # (row, stop ids) while below min_tokens
    blocked_tokens: list[tuple[int, list[int]]] = field(default_factory=list)
    max_num_logprobs: int | None = None  # top-k logprobs wanted by some row
    # The largest top_k when every row has one: only that many candidates can survive, so a
    # partial top-k replaces the sort of the whole vocabulary.
    max_top_k: int | None = None
    # CUDA: [B] int64 Philox seeds, a seeded request's from (seed, position); None: random.
    seeds: Tensor | None = None

    @property
    def filters(self) -> bool:
        """Anything but temperature changes the logits before the draw."""
        return bool(self.blocked_tokens) or any(
            t is not None for t in (self.repetition_penalty, self.top_k, self.top_p, self.min_p)
        )


@dataclass(slots=True)
class SamplerOutput:
    sampled: Tensor  # [B] int64
    logprob_token_ids: Tensor | None  # [B, 1 + k]: sampled token, then the top-k
    logprobs: Tensor | None  # [B, 1 + k]
    ranks: Tensor | None  # [B] 1-based rank of the sampled token


def profile_sampling_metadata(rows: int, device: torch.device) -> SamplingMetadata:
    """Every feature on, for measuring the sampler's peak memory."""
    ones = torch.ones(rows, device=device)
    return SamplingMetadata(
        temperature=ones,
        all_greedy=False,
        top_k=torch.full((rows,), 50, dtype=torch.int64, device=device),
        top_p=ones * 0.9,
        min_p=ones * 0.05,
        max_num_logprobs=20,
    )


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor to the device without a host sync: a copy from pageable memory would first
    wait for every kernel already queued (the forward) to finish."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def token_counts(token_ids: list[list[int]], vocab_size: int, device: torch.device) -> Tensor:
    """[B, vocab] int counts of each token id per row."""
    width = max((len(t) for t in token_ids), default=0)
    padded = torch.full((len(token_ids), width + 1), vocab_size, dtype=torch.int64)
    for i, ids in enumerate(token_ids):
        padded[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    padded = to_device(padded, device)
    counts = torch.zeros(len(token_ids), vocab_size + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded))
    return counts[:, :vocab_size]


def apply_penalties(logits: Tensor, meta: SamplingMetadata) -> Tensor:
    """OpenAI presence/frequency penalties on generated tokens; the CTRL repetition penalty on
    prompt and generated tokens (divide positive logits, multiply negative ones)."""
    assert meta.presence_penalty is not None and meta.frequency_penalty is not None
    assert meta.repetition_penalty is not None
    vocab = logits.shape[-1]
    out_counts = token_counts(meta.output_token_ids, vocab, logits.device)
    seen = (out_counts > 0) | (token_counts(meta.prompt_token_ids, vocab, logits.device) > 0)
    rep = meta.repetition_penalty.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - meta.frequency_penalty.unsqueeze(1) * out_counts
    return logits - meta.presence_penalty.unsqueeze(1) * (out_counts > 0)


MAX_PARTIAL_TOP_K = 1024  # above this a full sort is as cheap as torch.topk


def apply_top_k_top_p_min_p(
    logits: Tensor,
    top_k: Tensor | None,
    top_p: Tensor | None,
    min_p: Tensor | None,
    max_top_k: int | None = None,
) -> Tensor:
    """Set logits outside each row's allowed set to -inf (the top token always stays).

    max_top_k (every row has a top_k, none above it) sorts only the max_top_k best candidates.
    """
    if min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if top_k is None and top_p is None:
        return logits
    vocab = logits.shape[-1]
    if top_k is not None and max_top_k is not None and max_top_k <= MAX_PARTIAL_TOP_K < vocab:
        sorted_logits, order = logits.topk(max_top_k, dim=-1)  # sorted, best first
        masked = torch.full_like(logits, float("-inf"))
    else:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        masked = logits
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        ranks = torch.arange(sorted_logits.shape[-1], device=logits.device).unsqueeze(0)
        drop |= ranks >= top_k.unsqueeze(1)
    if top_p is not None:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better tokens
        # The float32 cumsum can reach 1.0 before the tail: rows with top_p = 1 (off) keep all.
        drop |= (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    drop[:, 0] = False
    return masked.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def exponential_noise(
    shape: tuple[int, int], generators: dict[int, torch.Generator], device: torch.device
) -> Tensor:
    noise = torch.empty(shape, device=device).exponential_()
    for row, gen in generators.items():
        noise[row].exponential_(generator=gen)
    return noise


class Sampler(nn.Module):
    def __init__(self, fused: bool | None = None) -> None:
        """fused: draw with the Triton kernel (None: on CUDA; True on the CPU runs it in the
        Triton interpreter, for tests). False on CUDA draws unseeded: the runner builds no CUDA
        generators (the fused kernel keys its noise by SamplingMetadata.seeds)."""
        super().__init__()
        self.fused = fused

    def forward(self, logits: Tensor, meta: SamplingMetadata) -> SamplerOutput:
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            raw_logprobs = logits.float().log_softmax(dim=-1)
        if self._fused(logits) and not meta.filters:  # one read of the logits, greedy included
            sampled = gumbel_argmax(logits, meta.temperature, self._seeds(logits, meta))
        else:
            sampled = self._filtered(logits.float(), meta)
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        return token_logprobs(raw_logprobs, sampled, meta.max_num_logprobs or 0)

    def draws_plain(self, logits: Tensor, meta: SamplingMetadata) -> bool:
        """Whether this step's draw is plain_draw alone: the fused kernel, no filter, no
        penalty, no logprobs (what a CUDA graph of the draw may replay)."""
        return (
            self._fused(logits)
            and not meta.filters
            and meta.max_num_logprobs is None
            and meta.seeds is not None
        )

    @staticmethod
    def plain_draw(logits: Tensor, temperature: Tensor, seeds: Tensor) -> Tensor:
        """forward's draw for a plain step (draws_plain) from its logits and columns."""
        return gumbel_argmax(logits, temperature, seeds)

    def _filtered(self, logits: Tensor, meta: SamplingMetadata) -> Tensor:
        if meta.blocked_tokens:  # .float() returns float32 input itself: keep the caller's intact
            logits = logits.clone()
            index = [(row, t) for row, token_ids in meta.blocked_tokens for t in token_ids]
            rows, cols = to_device(torch.tensor(index, dtype=torch.int64), logits.device).T
            logits[rows, cols] = float("-inf")
        if meta.repetition_penalty is not None:
            logits = apply_penalties(logits, meta)
        sampled = logits.argmax(dim=-1)
        if not meta.all_greedy:
            sampled = torch.where(meta.temperature == 0, sampled, self._random(logits, meta))
        return sampled

    def _fused(self, logits: Tensor) -> bool:
        return logits.is_cuda if self.fused is None else self.fused

    def _random(self, logits: Tensor, meta: SamplingMetadata) -> Tensor:
        temperature = torch.where(meta.temperature == 0, 1.0, meta.temperature)
        scaled = apply_top_k_top_p_min_p(
            logits / temperature.unsqueeze(1), meta.top_k, meta.top_p, meta.min_p, meta.max_top_k
        )
        if self._fused(logits):
            # The kept tokens' own logits at the rows' temperatures, as plain_draw scores them:
            # a row whose filter keeps every token draws bit for bit what a plain step draws.
            kept = logits.masked_fill(scaled == float("-inf"), float("-inf"))
            return gumbel_argmax(kept, temperature, self._seeds(logits, meta))
        probs = scaled.softmax(dim=-1)
        noise = exponential_noise(tuple(probs.shape), meta.generators, probs.device)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _seeds(logits: Tensor, meta: SamplingMetadata) -> Tensor:
        if meta.seeds is not None:
            return meta.seeds
        return torch.randint(0, 2**62, (logits.shape[0],), device=logits.device)


def token_logprobs(raw: Tensor, tokens: Tensor, k: int) -> SamplerOutput:
    """Each row's logprob and 1-based rank of `tokens` [B], then its top-k, from log-softmaxed
    float32 logits `raw` [B, vocab]."""
    chosen = raw.gather(1, tokens.unsqueeze(1))
    ranks = (raw > chosen).sum(dim=-1) + 1
    top_lp, top_ids = raw.topk(k, dim=-1) if k > 0 else (raw[:, :0], tokens[:, None][:, :0])
    ids = torch.cat([tokens.unsqueeze(1), top_ids], dim=1)
    return SamplerOutput(tokens, ids, torch.cat([chosen, top_lp], dim=1), ranks)


def score_tokens(logits: Tensor, targets: list[int], k: int | None) -> list[TokenLogprobs]:
    """Prompt logprobs: each row's logprob and rank of its target token, and its top-k."""
    target = torch.tensor(targets, device=logits.device)
    out = token_logprobs(logits.float().log_softmax(dim=-1), target, k or 0)
    assert out.logprob_token_ids is not None and out.logprobs is not None and out.ranks is not None
    rows = zip(
        out.logprob_token_ids.tolist(), out.logprobs.tolist(), out.ranks.tolist(), strict=True
    )
    return [TokenLogprobs(ids, lps, rank) for ids, lps, rank in rows]


def prompt_logprob_entries(
    inputs: StepInputs,
    hidden: Tensor,
    states: dict[str, CachedRequestState],
    compute_logits: Callable[[Tensor], Tensor],
) -> dict[str, list[TokenLogprobs]]:
    """Logprobs of each prompt token given the tokens before it, for the step's rows that want
    them (inputs.prompt_logprob_spans), PROMPT_LOGPROBS_ROWS positions at a time."""
    result: dict[str, list[TokenLogprobs]] = {}
    for i, (lo, hi) in inputs.prompt_logprob_spans.items():
        state = states[inputs.req_ids[i]]
        first = state.num_computed_tokens + 1  # prompt index scored by row lo
        entries: list[TokenLogprobs] = []
        for a in range(lo, hi, PROMPT_LOGPROBS_ROWS):
            b = min(a + PROMPT_LOGPROBS_ROWS, hi)
            targets = state.prompt_token_ids[first + a - lo : first + b - lo]
            logits = compute_logits(hidden[a:b])
            entries += score_tokens(logits, targets, state.sampling_params.prompt_logprobs)
        result[state.req_id] = entries
    return result
