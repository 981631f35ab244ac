"""Sampler tests against plain float32 references: penalties, top-k/top-p/min-p sets, seeded draws,
the sampled distribution, min_tokens blocking and logprobs."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from atom.executor.input_batch import (
    CachedRequestState,
    StepBuffers,
    build_sampling_metadata,
    position_seed,
)
from atom.executor.sampler import (
    Sampler,
    apply_penalties,
    apply_top_k_top_p_min_p,
)
from atom.sampling_params import SamplingParams
from tests.executor.sampling_cases import CPU, VOCAB_OFF, make_meta, make_state, seeded


def _staging() -> StepBuffers:
    """Fresh buffers per call: a step's sampling columns are views of them."""
    return StepBuffers(max_tokens=8, max_seqs=8, max_blocks=1, device=CPU)


BOUNDARY_EPS = 1e-5  # reference values this close to a threshold may round either way


# ---- references -------------------------------------------------------------------------------


def allowed_ref(
    logits: Tensor, top_k: int | None, top_p: float | None, min_p: float | None
) -> tuple[Tensor, Tensor]:
    """(allowed, near_boundary) over one row of float32 logits, filters applied in the sampler's
    order (min_p, then top_k, then top_p renormalized over what is left). near_boundary marks
    tokens whose fate rests on float rounding."""
    logits = logits.float()
    allowed = torch.ones_like(logits, dtype=torch.bool)
    near = torch.zeros_like(allowed)
    if min_p is not None:
        probs = logits.softmax(-1)
        threshold = min_p * probs.max()
        allowed &= probs >= threshold
        near |= (probs - threshold).abs() <= BOUNDARY_EPS * probs.max()
    if top_k is not None:
        # rank among the allowed tokens = number of allowed tokens with a larger logit
        better = (logits[None, :] > logits[:, None]) & allowed[None, :]
        allowed &= better.sum(-1) < top_k
    if top_p is not None:
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        # [V, V]: mass of the tokens strictly more probable than each token
        mass_better = (probs[None, :] * (probs[None, :] > probs[:, None])).sum(-1)
        near |= allowed & ((mass_better - top_p).abs() <= BOUNDARY_EPS)
        allowed &= mass_better < top_p
    return allowed, near


def penalties_ref(
    logits: Tensor,
    prompts: list[list[int]],
    outputs: list[list[int]],
    presence: list[float],
    frequency: list[float],
    repetition: list[float],
) -> Tensor:
    rows = []
    vocab = logits.shape[1]
    for b, x in enumerate(logits.float()):
        counts = torch.bincount(torch.tensor(outputs[b], dtype=torch.int64), minlength=vocab)
        seen = counts > 0
        seen[prompts[b]] = True
        x = torch.where(seen, torch.where(x > 0, x / repetition[b], x * repetition[b]), x)
        rows.append(x - frequency[b] * counts - presence[b] * (counts > 0))
    return torch.stack(rows)


# ---- seeds and greedy -------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible() -> None:
    torch.manual_seed(0)
    sampler = Sampler()
    logits = torch.randn(4, 37) * 0.5  # flat enough that different seeds disagree
    seeds = [11, 12, 13, 14]

    def draws(seeds: list[int], steps: int = 8) -> Tensor:
        gens = seeded(seeds)
        return torch.stack(
            [sampler(logits, make_meta(4, generators=gens)).sampled for _ in range(steps)]
        )

    first = draws(seeds)
    assert torch.equal(first, draws(seeds))  # the generators advance the same way every time
    other = draws([21, 22, 23, 24])
    for row in range(4):
        assert not torch.equal(first[:, row], other[:, row])

    # A seeded row draws from its own generator only: unseeded neighbours change nothing.
    gens = {2: torch.Generator(CPU).manual_seed(13)}
    alone = [sampler(logits, make_meta(4, generators=gens)).sampled[2] for _ in range(8)]
    assert torch.equal(torch.stack(alone), first[:, 2])


def test_greedy_rows_take_argmax_in_mixed_batch() -> None:
    torch.manual_seed(1)
    sampler = Sampler()
    logits = torch.randn(6, 1000)
    temps = [0.0, 1.0, 0.0, 0.7, 0.0, 2.0]
    argmax = logits.argmax(-1)
    for _ in range(5):
        out = sampler(
            logits, make_meta(6, temps, top_k=[5] * 6, top_p=[0.5] * 6, min_p=[0.1] * 6)
        ).sampled
        assert torch.equal(out[[0, 2, 4]], argmax[[0, 2, 4]])
    assert torch.equal(sampler(logits, make_meta(6, 0.0)).sampled, argmax)


def test_build_sampling_metadata_greedy_and_seeded() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 37) * 0.3
    rows = [
        make_state("g", SamplingParams(temperature=0.0)),
        make_state("s", SamplingParams(seed=5), seed=5),
        make_state("r", SamplingParams(top_k=3)),
    ]
    meta = build_sampling_metadata(rows, _staging())
    assert not meta.all_greedy and set(meta.generators) == {1}
    assert meta.top_k is not None and meta.top_k.tolist() == [VOCAB_OFF, VOCAB_OFF, 3]
    assert meta.top_p is None and meta.min_p is None and meta.presence_penalty is None
    seq = [Sampler()(logits, meta).sampled for _ in range(8)]
    assert all(int(s[0]) == int(logits[0].argmax()) for s in seq)
    assert all(int(s[2]) in logits[2].topk(3).indices.tolist() for s in seq)
    gen = torch.Generator(CPU).manual_seed(position_seed(5, 0))  # seed 5, first output token
    again = [Sampler()(logits, make_meta(3, generators={1: gen})).sampled[1] for _ in range(8)]
    assert [int(s[1]) for s in seq] == [int(t) for t in again]


# ---- top-k / top-p / min-p --------------------------------------------------------------------

FILTER_CASES = [
    (1, None, None),
    (5, None, None),
    (36, None, None),
    (None, 0.05, None),
    (None, 0.5, None),
    (None, 0.9, None),
    (None, None, 0.05),
    (None, None, 0.3),
    (None, None, 1.0),
    (20, 0.8, None),
    (50, 0.9, 0.02),
    (None, 0.7, 0.1),
]
SAMPLE_CASES = [FILTER_CASES[i] for i in (1, 4, 5, 7, 9, 11)]


@pytest.mark.parametrize("vocab", [37, 1000])
@pytest.mark.parametrize(("top_k", "top_p", "min_p"), FILTER_CASES)
def test_filters_match_reference_set(
    vocab: int, top_k: int | None, top_p: float | None, min_p: float | None
) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=gen) * torch.tensor([[0.5], [1.0], [2.0], [4.0]])
    rows = logits.shape[0]
    masked = apply_top_k_top_p_min_p(
        logits,
        None if top_k is None else torch.full((rows,), top_k),
        None if top_p is None else torch.full((rows,), top_p),
        None if min_p is None else torch.full((rows,), min_p),
    )
    kept = ~masked.isinf()
    assert torch.equal(masked[kept], logits[kept])
    for row in range(rows):
        allowed, near = allowed_ref(logits[row], top_k, top_p, min_p)
        assert int(near.sum()) <= 1  # the comparison below skips next to nothing
        assert torch.equal(kept[row][~near], allowed[~near]), f"row {row}"
        assert kept[row, logits[row].argmax()]


@pytest.mark.parametrize("vocab", [37, 1000])
@pytest.mark.parametrize(("top_k", "top_p", "min_p"), SAMPLE_CASES)
def test_samples_stay_in_allowed_set(
    vocab: int, top_k: int | None, top_p: float | None, min_p: float | None
) -> None:
    torch.manual_seed(vocab)
    draws, temperature = 2000, 0.8
    row = torch.randn(vocab) * 2.0
    allowed, near = allowed_ref(row / temperature, top_k, top_p, min_p)
    meta = make_meta(
        draws,
        temperature,
        top_k=None if top_k is None else [top_k] * draws,
        top_p=None if top_p is None else [top_p] * draws,
        min_p=None if min_p is None else [min_p] * draws,
    )
    sampled = Sampler()(row.expand(draws, vocab), meta).sampled
    ok = allowed | near
    assert ok[sampled].all(), sorted(set(sampled[~ok[sampled]].tolist()))
    if allowed.sum() > 1:
        assert sampled.unique().numel() > 1


def test_filters_per_row_with_off_rows() -> None:
    """Rows with a filter off (top_k = vocab, top_p = 1, min_p = 0) keep every token even when
    other rows of the batch filter."""
    gen = torch.Generator().manual_seed(3)
    vocab = 1000
    logits = torch.randn(6, vocab, generator=gen) * 5.0
    logits[:, :3] += 20.0  # a peaked head: the float32 cumsum reaches 1 long before the tail
    top_k = [VOCAB_OFF, 7, VOCAB_OFF, VOCAB_OFF, 100, VOCAB_OFF]
    top_p = [1.0, 1.0, 0.6, 1.0, 0.95, 1.0]
    min_p = [0.0, 0.0, 0.0, 0.2, 0.01, 0.0]
    masked = apply_top_k_top_p_min_p(
        logits, torch.tensor(top_k), torch.tensor(top_p), torch.tensor(min_p)
    )
    kept = ~masked.isinf()
    assert kept[0].all() and kept[5].all()
    for row in range(6):
        allowed, near = allowed_ref(
            logits[row],
            None if top_k[row] == VOCAB_OFF else top_k[row],
            None if top_p[row] == 1.0 else top_p[row],
            None if min_p[row] == 0.0 else min_p[row],
        )
        assert torch.equal(kept[row][~near], allowed[~near]), f"row {row}"


# ---- distribution -----------------------------------------------------------------------------


def chi_square(sampled: Tensor, probs: Tensor) -> float:
    counts = torch.bincount(sampled, minlength=probs.numel()).double()
    expected = probs.double() * sampled.numel()
    assert (counts[expected == 0] == 0).all()
    live = expected > 0
    return float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())


# Chi-square with <= 7 degrees of freedom exceeds 35 with probability < 1e-5.
CHI2_LIMIT = 35.0


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_distribution_matches_softmax(temperature: float) -> None:
    torch.manual_seed(4)
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.2, 1.2])
    draws = 40_000
    sampled = Sampler()(logits.expand(draws, -1), make_meta(draws, temperature)).sampled
    assert chi_square(sampled, (logits / temperature).softmax(-1)) < CHI2_LIMIT


def test_distribution_after_top_k_is_renormalized() -> None:
    torch.manual_seed(5)
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.2, 1.2])
    draws = 40_000
    meta = make_meta(draws, 1.0, top_k=[4] * draws)
    sampled = Sampler()(logits.expand(draws, -1), meta).sampled
    expected = logits.masked_fill(logits < logits.topk(4).values[-1], float("-inf")).softmax(-1)
    assert chi_square(sampled, expected) < CHI2_LIMIT


def test_seeded_distribution_matches_softmax() -> None:
    logits = torch.tensor([[0.3, -0.2, 0.9, 0.0, -1.0]])
    gens = seeded([7])
    sampled = torch.cat(
        [Sampler()(logits, make_meta(1, generators=gens)).sampled for _ in range(3000)]
    )
    assert chi_square(sampled, logits[0].softmax(-1)) < CHI2_LIMIT


# ---- penalties --------------------------------------------------------------------------------


def test_penalties_match_reference() -> None:
    gen = torch.Generator().manual_seed(6)
    vocab = 37
    logits = torch.randn(5, vocab, generator=gen) * 3.0
    prompts = [[1, 2, 3, 3], [4, 5], [], [6, 7, 8], [9]]
    outputs = [[3, 10, 10, 10, 11], [], [12, 12, 0], [6, 36, 36], [9, 9, 13]]
    presence = [0.5, 1.0, 0.0, -0.7, 2.0]
    frequency = [0.3, 0.0, 1.5, 0.4, -2.0]
    repetition = [1.3, 2.0, 1.0, 0.8, 1.0]
    meta = make_meta(5)
    meta.presence_penalty = torch.tensor(presence)
    meta.frequency_penalty = torch.tensor(frequency)
    meta.repetition_penalty = torch.tensor(repetition)
    meta.prompt_token_ids, meta.output_token_ids = prompts, outputs
    expected = penalties_ref(logits, prompts, outputs, presence, frequency, repetition)
    torch.testing.assert_close(apply_penalties(logits, meta), expected, rtol=0, atol=1e-6)


def test_penalties_through_build_sampling_metadata() -> None:
    """Presence/frequency count generated tokens only; repetition covers prompt and output.
    Greedy rows pick the argmax of the penalized logits."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 37, generator=gen)
    logits[:, 4] = 6.0  # in every prompt: only the repetition penalty may touch it
    logits[:, 5] = 5.5  # generated twice
    rows = [
        make_state("p", SamplingParams(temperature=0.0, presence_penalty=2.0), [4], [5, 5]),
        make_state("f", SamplingParams(temperature=0.0, frequency_penalty=1.0), [4], [5, 5]),
        make_state("r", SamplingParams(temperature=0.0, repetition_penalty=2.0), [4], [5]),
    ]
    meta = build_sampling_metadata(rows, _staging())
    expected = penalties_ref(
        logits, [[4]] * 3, [[5, 5], [5, 5], [5]], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1, 1, 2.0]
    )
    penalized = apply_penalties(logits, meta)
    torch.testing.assert_close(penalized, expected, rtol=0, atol=1e-6)
    assert penalized[0, 4] == logits[0, 4] and penalized[1, 4] == logits[1, 4]
    assert torch.equal(Sampler()(logits, meta).sampled, expected.argmax(-1))
    plain = build_sampling_metadata([make_state("x", SamplingParams())], _staging())
    assert plain.repetition_penalty is None and plain.output_token_ids == []


# ---- min_tokens and logprobs ------------------------------------------------------------------


def test_min_tokens_blocks_stop_ids() -> None:
    torch.manual_seed(8)
    vocab, eos, stop = 37, 7, 5
    logits = torch.randn(4, vocab)
    logits[:, [eos, stop]] = 50.0
    params = [
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop]),
        SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=[stop]),
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop], ignore_eos=True),
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[stop]),
    ]
    params = [p.clone(_eos_token_ids=(eos,)) for p in params]
    rows = [make_state(str(i), p, output=[1, 2]) for i, p in enumerate(params)]
    meta = build_sampling_metadata(rows, _staging())
    assert meta.blocked_tokens == [(0, [stop, eos]), (1, [stop, eos]), (2, [stop])]
    original = logits.clone()
    for _ in range(20):
        sampled = Sampler()(logits, meta).sampled.tolist()
        assert sampled[0] not in (stop, eos) and sampled[1] not in (stop, eos)
        assert sampled[2] == eos and sampled[3] in (stop, eos)
    assert torch.equal(logits, original)  # the caller's logits are not masked in place
    for row in rows:
        row.append_output(3)
    assert build_sampling_metadata(rows, _staging()).blocked_tokens == []


@pytest.mark.parametrize("k", [0, 1, 5])
def test_logprobs_are_raw_and_ranked(k: int) -> None:
    gen = torch.Generator().manual_seed(9)
    vocab = 37
    logits = torch.randn(5, vocab, generator=gen) * 2.0
    logits[1, 3] = 20.0  # the raw favourite of row 1, blocked below
    meta = make_meta(
        5,
        [0.0, 0.0, 1.0, 0.5, 2.0],
        top_k=[VOCAB_OFF, VOCAB_OFF, 10, VOCAB_OFF, 3],
        generators=seeded([1, 2, 3, 4, 5]),
        max_num_logprobs=k,
        blocked_tokens=[(1, [3])],
    )
    meta.presence_penalty = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0])
    meta.frequency_penalty = torch.zeros(5)
    meta.repetition_penalty = torch.tensor([1.0, 1.0, 1.0, 3.0, 1.0])
    meta.prompt_token_ids = [[0], [0], [0], [int(logits[3].argmax())], [0]]
    meta.output_token_ids = [[int(logits[0].argmax())], [], [], [], []]
    out = Sampler()(logits, meta)
    raw = logits.log_softmax(-1)
    assert out.logprob_token_ids is not None and out.logprobs is not None and out.ranks is not None
    assert out.logprob_token_ids.shape == out.logprobs.shape == (5, 1 + k)
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled)
    assert int(out.sampled[1]) != 3
    torch.testing.assert_close(out.logprobs[:, 0], raw.gather(1, out.sampled[:, None])[:, 0])
    top = raw.sort(dim=-1, descending=True)
    assert torch.equal(out.logprob_token_ids[:, 1:], top.indices[:, :k])
    torch.testing.assert_close(out.logprobs[:, 1:], top.values[:, :k])
    assert (out.logprobs[:, 1:].diff(dim=-1) <= 0).all()
    for row in range(5):
        position = top.indices[row].tolist().index(int(out.sampled[row]))
        assert int(out.ranks[row]) == position + 1
    if k:
        assert int(out.logprob_token_ids[1, 1]) == 3  # raw: blocking changes no logprob


def test_no_logprobs_when_not_asked() -> None:
    out = Sampler()(torch.randn(2, 37), make_meta(2, 1.0))
    assert out.logprob_token_ids is None and out.logprobs is None and out.ranks is None


@pytest.mark.parametrize("top_p", [None, 0.3, 0.9])
def test_partial_top_k_equals_the_full_sort(top_p: float | None) -> None:
    """Every row with a top_k (as Qwen3's generation config sets: 20): sorting only the
    max(top_k) best candidates masks exactly what the full-vocabulary sort masks."""
    gen = torch.Generator().manual_seed(11)
    vocab, rows = 5000, 6
    logits = torch.randn(rows, vocab, generator=gen) * torch.linspace(0.5, 4.0, rows)[:, None]
    top_k = torch.tensor([20, 1, 7, 20, 13, 2])
    top_p_t = None if top_p is None else torch.full((rows,), top_p)
    min_p = torch.full((rows,), 0.01)
    full = apply_top_k_top_p_min_p(logits, top_k, top_p_t, min_p)
    partial = apply_top_k_top_p_min_p(logits, top_k, top_p_t, min_p, max_top_k=20)
    assert torch.equal(full, partial)
    assert ((~partial.isinf()).sum(dim=-1) <= top_k).all()


def test_metadata_max_top_k_only_when_every_row_has_one() -> None:
    from atom.executor.input_batch import CachedRequestState, build_sampling_metadata
    from atom.sampling_params import SamplingParams

    def rows(*ks: int) -> list[CachedRequestState]:
        return [
            CachedRequestState(str(i), [1], [], SamplingParams(temperature=1.0, top_k=k), [0], 0)
            for i, k in enumerate(ks)
        ]

    assert build_sampling_metadata(rows(20, 5), _staging()).max_top_k == 20
    assert build_sampling_metadata(rows(20, 0), _staging()).max_top_k is None
    assert build_sampling_metadata(rows(-1), _staging()).max_top_k is None
