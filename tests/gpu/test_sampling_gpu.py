"""The Gumbel-max sampling kernel on CUDA: equal to its reference on the Philox uniforms in bf16,
fp16, fp32 at Qwen3's vocabulary, the softmax distribution, no host sync, and the Sampler's two
paths drawing the same noise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from atom import LLM, SamplingParams
from atom.executor.sampler import Sampler, SamplingMetadata
from atom.kernels.sampling import gumbel_argmax, philox_uniform
from tests.gpu.conftest import SMALL_ENGINE
from tests.kernels.draws import assert_same_draw

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB = 151_936


def _meta(
    temperature: torch.Tensor, seeds: torch.Tensor, top_k: torch.Tensor | None
) -> SamplingMetadata:
    return SamplingMetadata(temperature, bool((temperature == 0).all()), top_k, seeds=seeds)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 7, 256])
def test_matches_reference(rows: int, dtype: torch.dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(rows)
    logits = (torch.randn(rows, VOCAB, device="cuda", generator=gen) * 4).to(dtype)
    temperature = torch.tensor([0.0, 0.6, 1.0, 1.5] * rows, device="cuda")[:rows]
    seeds = torch.randint(0, 2**62, (rows,), device="cuda", generator=gen)
    out = gumbel_argmax(logits, temperature, seeds)
    assert_same_draw(out, logits, temperature, philox_uniform(seeds, VOCAB))


def test_samples_the_softmax_distribution() -> None:
    rows = 200_000
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]], device="cuda").expand(rows, -1)
    temperature = torch.full((rows,), 0.7, device="cuda")
    seeds = torch.randint(0, 2**62, (rows,), device="cuda")
    freq = torch.bincount(gumbel_argmax(logits, temperature, seeds), minlength=5) / rows
    p = torch.softmax(logits[0] / 0.7, dim=-1)
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / rows).sqrt()).all(), (freq, p)


def test_samples_the_softmax_distribution_at_qwen3s_vocabulary() -> None:
    """One token against 151,935 others, at even odds: the winner's uniform sits within ~1e-5 of
    1, where an inexact inner log2 would bias the draw (a score turned infinite wins outright)."""
    rows = 20_000
    logits = torch.zeros(VOCAB, device="cuda")
    logits[1234] = torch.log(torch.tensor(VOCAB - 1.0))  # p = 1/2 at temperature 1
    temperature = torch.ones(rows, device="cuda")
    seeds = torch.randint(0, 2**62, (rows,), device="cuda")
    out = gumbel_argmax(logits.expand(rows, -1), temperature, seeds)
    freq = (out == 1234).float().mean().item()
    assert abs(freq - 0.5) <= 4 * (0.25 / rows) ** 0.5, freq


def test_no_host_sync() -> None:
    logits = torch.randn(64, VOCAB, device="cuda", dtype=torch.bfloat16)
    temperature = torch.ones(64, device="cuda")
    seeds = torch.arange(64, device="cuda")
    gumbel_argmax(logits, temperature, seeds)  # compile first
    torch.cuda.set_sync_debug_mode("error")
    try:
        gumbel_argmax(logits, temperature, seeds)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_sampler_paths_share_the_noise() -> None:
    """A row whose filter keeps everything draws, through the filtered path, what the plain
    path draws: a seeded request's token does not depend on its neighbours' filters."""
    rows = 32
    logits = torch.randn(rows, VOCAB, device="cuda", dtype=torch.bfloat16) * 3
    temperature = torch.full((rows,), 0.8, device="cuda")
    seeds = torch.randint(0, 2**62, (rows,), device="cuda")
    plain = Sampler()(logits, _meta(temperature, seeds, None)).sampled
    top_k = torch.full((rows,), 1 << 62, device="cuda")
    top_k[0] = 5
    filtered = Sampler()(logits, _meta(temperature, seeds, top_k)).sampled
    assert torch.equal(filtered[1:], plain[1:])
    assert filtered[0] in logits[0].float().topk(5).indices


def test_seeded_request_ignores_its_neighbours(tmp_path: Path) -> None:
    """Through the engine on CUDA (float32, level 0, one batch size): a seeded request draws the
    same tokens beside plain neighbours as beside filtered, greedy and penalised ones."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=512,
        initializer_range=0.05,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    llm = LLM(
        str(tmp_path),
        skip_tokenizer_init=True,
        dtype="float32",
        level=0,
        enable_prefix_caching=False,  # the second run must compute what the first did
        **SMALL_ENGINE,
    )
    prompts = [{"prompt_token_ids": list(range(5 + i, 40 + i))} for i in range(4)]
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=24, ignore_eos=True)

    def run(neighbours: list[SamplingParams]) -> list[int]:
        outs = llm.generate(prompts, [seeded, *neighbours], use_tqdm=False)
        return outs[0].outputs[0].token_ids

    plain = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    mixed = [
        SamplingParams(temperature=0.7, top_p=0.5, top_k=20, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=1.0, repetition_penalty=1.3, max_tokens=24, ignore_eos=True),
    ]
    first = run([plain] * 3)
    assert run(mixed) == first
    assert len(set(first)) > 1
