"""gumbel_argmax (Triton; the interpreter without a GPU) against the float32 reference fed the same
Philox uniforms, and against the distribution it must sample."""

from __future__ import annotations

import pytest
import torch

from atom.kernels import sampling
from atom.kernels.sampling import gumbel_argmax, gumbel_argmax_ref, philox_uniform
from tests.kernels.draws import assert_same_draw

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _logits(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=gen) * 3).to(device=DEVICE, dtype=dtype)


def _seeds(rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**62, (rows,), generator=gen).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "vocab"), [(1, 5000), (7, 3001), (40, 1030)])
def test_matches_reference(rows: int, vocab: int, dtype: torch.dtype) -> None:
    """Mixed greedy and random rows; vocab sizes that split unevenly across programs."""
    logits = _logits(rows, vocab, dtype, seed=vocab)
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0] * rows, device=DEVICE)[:rows]
    seeds = _seeds(rows, seed=rows)
    out = gumbel_argmax(logits, temperature, seeds)
    assert_same_draw(out, logits, temperature, philox_uniform(seeds, vocab))


def test_greedy_rows_take_the_first_maximum() -> None:
    logits = torch.zeros(3, 2100, device=DEVICE)
    logits[0, [5, 1500, 2099]] = 4.0  # ties across programs' splits
    logits[1, 2099] = 1.0
    logits[2] = float("-inf")  # a fully masked row answers index 0, as torch.argmax does
    out = gumbel_argmax(logits, torch.zeros(3, device=DEVICE), _seeds(3, seed=0))
    assert out.tolist() == [5, 2099, 0]


def test_nan_wins_as_in_torch_argmax() -> None:
    logits = torch.zeros(2, 1500, device=DEVICE)
    logits[:, 3] = 5.0
    logits[:, 1200] = float("nan")
    temperature = torch.tensor([0.0, 1.0], device=DEVICE)
    out = gumbel_argmax(logits, temperature, _seeds(2, seed=1))
    assert out.tolist() == [1200, 1200] == logits.argmax(-1).tolist()


def test_a_row_depends_on_its_seed_alone() -> None:
    """The same seed draws the same token whatever the batch around it; another seed differs."""
    logits = _logits(1, 1000, torch.float32, seed=1).expand(6, -1)
    seeds = _seeds(6, seed=2)
    seeds[3] = seeds[0]
    one = torch.ones(6, device=DEVICE)
    out = gumbel_argmax(logits, one, seeds)
    assert out[3] == out[0] and len(set(out.tolist())) > 2
    alone = gumbel_argmax(logits[:1], one[:1], seeds[:1])
    assert alone.item() == out[0].item()


def test_reference_samples_the_softmax_distribution() -> None:
    """Gumbel-max on uniform noise: frequencies within 4 sigma of softmax(l/T). (The kernel equals
    the reference on its Philox uniforms, checked above; tests/gpu repeats this on the kernel.)"""
    rows = 40_000
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]]).expand(rows, -1)
    temperature = torch.full((rows,), 0.7)
    gen = torch.Generator().manual_seed(3)
    sampled = gumbel_argmax_ref(logits, temperature, torch.rand(rows, 5, generator=gen))
    p = torch.softmax(logits[0] / 0.7, dim=-1)
    sigma = (p * (1 - p) / rows).sqrt()
    freq = torch.bincount(sampled, minlength=5) / rows
    assert ((freq - p).abs() <= 4 * sigma).all(), (freq, p)


def test_philox_uniforms_are_uniform_per_seed() -> None:
    """In [0, 1), flat over 10 bins (chi-square, 9 degrees of freedom, < 1e-5 to exceed 40);
    two seeds, two streams."""
    u = philox_uniform(_seeds(2, seed=6), 50_000).cpu()
    assert ((u >= 0) & (u < 1)).all()
    for row in u:
        counts = torch.histc(row, bins=10, min=0.0, max=1.0)
        assert float(((counts - 5000) ** 2 / 5000).sum()) < 40.0
    assert not torch.equal(u[0], u[1])


def test_strided_rows_and_empty_batch() -> None:
    wide = _logits(4, 1500, torch.float32, seed=4)
    view = wide[:, 100:1300]  # row stride 1500
    temperature = torch.tensor([0.0, 1.0, 1.0, 0.3], device=DEVICE)
    seeds = _seeds(4, seed=5)
    out = gumbel_argmax(view, temperature, seeds)
    assert_same_draw(out, view, temperature, philox_uniform(seeds, 1200))
    empty = gumbel_argmax(wide[:0], temperature[:0], seeds[:0])
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_split_sizes_cover_the_vocabulary() -> None:
    for rows in (1, 3, 256, 1024):
        for vocab in (1, 1023, 1025, 151_936):
            splits, chunk = sampling._splits(rows, vocab)
            assert chunk % sampling._BLOCK == 0
            assert (splits - 1) * chunk < vocab <= splits * chunk


def test_same_draw_check_rejects_another_token() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    temperature, uniform = torch.ones(1), torch.full((1, 3), 0.5)
    assert_same_draw(torch.tensor([1]), logits, temperature, uniform)
    with pytest.raises(AssertionError):
        assert_same_draw(torch.tensor([2]), logits, temperature, uniform)
