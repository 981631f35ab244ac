"""The fused (Triton) draw of the sampler, as on CUDA; here in the Triton interpreter: Gumbel-max
on Philox noise, the plain draw a graph may replay, filters, blocked and greedy rows, logprobs, and
the per-row Philox seeds."""

from __future__ import annotations

import pytest
import torch

from atom.executor.input_batch import _philox_seeds, position_seed
from atom.executor.sampler import Sampler, SamplingMetadata
from atom.kernels.sampling import gumbel_argmax_ref, philox_uniform
from atom.sampling_params import SamplingParams
from tests.executor.sampling_cases import VOCAB_OFF, make_meta, make_state


def _with_seeds(meta: SamplingMetadata, seeds: list[int]) -> SamplingMetadata:
    meta.seeds = torch.tensor(seeds, dtype=torch.int64)
    return meta


def test_fused_plain_draw_is_gumbel_max_on_philox_noise() -> None:
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(5, 301, generator=gen) * 3
    temps = [0.0, 1.0, 0.6, 0.0, 1.9]
    meta = _with_seeds(make_meta(5, temps), [11, 12, 13, 14, 15])
    out = Sampler(fused=True)(logits, meta).sampled
    uniform = philox_uniform(meta.seeds, 301)
    assert torch.equal(out, gumbel_argmax_ref(logits, meta.temperature, uniform))
    assert out[0] == logits[0].argmax() and out[3] == logits[3].argmax()


def test_draws_plain_selects_what_a_graph_of_the_draw_may_replay() -> None:
    """plain_draw is forward's draw for a plain step; filters, logprobs, an unfused sampler or
    missing seeds send the step to forward."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(4, 211, generator=gen)
    meta = _with_seeds(make_meta(4, [0.0, 0.7, 1.3, 1.0]), [5, 6, 7, 8])
    fused = Sampler(fused=True)
    assert fused.draws_plain(logits, meta)
    drawn = fused.plain_draw(logits, meta.temperature, meta.seeds)
    assert torch.equal(drawn, fused(logits, meta).sampled)
    assert not Sampler(fused=False).draws_plain(logits, meta)
    assert not fused.draws_plain(logits, make_meta(4, 0.7))  # no seeds
    assert not fused.draws_plain(
        logits, _with_seeds(make_meta(4, 0.7, max_num_logprobs=0), [1] * 4)
    )
    assert not fused.draws_plain(logits, _with_seeds(make_meta(4, 0.7, top_p=[0.9] * 4), [1] * 4))


def test_fused_filters_keep_the_same_noise() -> None:
    """A row's draw does not depend on filters elsewhere in the batch: with a filter that keeps
    everything (top_k off) the filtered path draws what the plain path draws."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 257, generator=gen) * 2
    plain = Sampler(fused=True)(logits, _with_seeds(make_meta(3, 0.8), [1, 2, 3])).sampled
    meta = _with_seeds(make_meta(3, 0.8, top_k=[VOCAB_OFF, 4, VOCAB_OFF]), [1, 2, 3])
    filtered = Sampler(fused=True)(logits, meta).sampled
    assert filtered[0] == plain[0] and filtered[2] == plain[2]
    assert filtered[1] in logits[1].topk(4).indices


def test_fused_blocked_and_greedy_rows() -> None:
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(4, 199, generator=gen)
    top = logits.argmax(-1).tolist()
    blocked = [(1, [top[1]]), (2, [top[2], 7])]
    meta = _with_seeds(make_meta(4, [0.0, 0.0, 1.0, 1.0], blocked_tokens=blocked), [5, 6, 7, 8])
    out = Sampler(fused=True)(logits, meta).sampled.tolist()
    assert out[0] == top[0]
    masked = logits[1].clone()
    masked[top[1]] = float("-inf")
    assert out[1] == masked.argmax()
    assert out[2] not in (top[2], 7)


def test_fused_logprobs_are_those_of_the_draw() -> None:
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(3, 101, generator=gen)
    meta = _with_seeds(make_meta(3, 1.0, max_num_logprobs=2), [1, 2, 3])
    out = Sampler(fused=True)(logits, meta)
    assert out.logprob_token_ids is not None and out.logprobs is not None
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled)
    raw = logits.log_softmax(-1)
    torch.testing.assert_close(out.logprobs[:, 0], raw.gather(1, out.sampled[:, None])[:, 0])


def test_philox_seeds_wrap_as_position_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The numpy pass equals position_seed row by row where the sum passes 2**63."""
    base = (2**63 - 2) * pow(0x9E3779B97F4A7C15, -1, 2**63) % 2**63  # row 0's seed: 2**63 - 2
    monkeypatch.setattr(torch, "randint", lambda *a, **k: torch.tensor([base]))
    rows = [make_state(str(i), SamplingParams()) for i in range(5)]
    assert _philox_seeds(rows).tolist() == [position_seed(base, i) for i in range(5)]
    assert position_seed(base, 0) == 2**63 - 2 and position_seed(base, 2) == 0


def test_philox_seeds_of_seeded_and_unseeded_rows() -> None:
    rows = [
        make_state("a", SamplingParams(seed=42), output=[1, 2]),
        make_state("b", SamplingParams()),
        make_state("c", SamplingParams()),
    ]
    rows[0].num_pending = 1
    torch.manual_seed(0)
    base = int(torch.randint(0, 2**62, (1,)))  # the draw _philox_seeds makes
    torch.manual_seed(0)
    seeds = _philox_seeds(rows).tolist()
    assert seeds[0] == position_seed(42, 3)  # two outputs + one pending: position 3
    assert seeds[1:] == [position_seed(base, 1), position_seed(base, 2)]
    torch.manual_seed(0)
    assert _philox_seeds(rows).tolist() == seeds  # the global seed repeats a run
