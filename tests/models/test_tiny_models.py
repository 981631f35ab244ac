"""Tiny random Llama and Qwen3 checkpoints made with transformers: ATOM must match HF exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from atom import LLM, SamplingParams

NEW_TOKENS = 32
PROMPT_LENS = [1, 5, 16, 17, 40, 71]


def _configs() -> dict[str, Any]:
    common: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=512,
        initializer_range=0.2,  # well-separated logits: no greedy near-ties
        tie_word_embeddings=False,
    )
    llama3_rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    return {
        "llama": transformers.LlamaConfig(**common),
        "llama3-rope": transformers.LlamaConfig(**common, rope_parameters=llama3_rope),
        "qwen3": transformers.Qwen3Config(**common),
        "mistral-sliding-window": transformers.MistralConfig(**common, sliding_window=24),
        "qwen3-sliding-window": transformers.Qwen3Config(
            **common, use_sliding_window=True, sliding_window=24, max_window_layers=1
        ),
    }


CONFIGS = _configs()


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = CONFIGS[request.param]
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, max_shard_size="100KB")  # sharded, with an index
    return path


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def _prompts(seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _hf_greedy(model: Any, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            top_k=None,
            top_p=None,
            temperature=None,
        )
    return out[0, len(prompt) :].tolist()


SMALL_KV = 8 << 20  # the CPU default (2 GiB) costs seconds of zero-filling per engine


def _atom_greedy(checkpoint: Path, prompts: list[list[int]], **kwargs: Any) -> list[list[int]]:
    kwargs.setdefault("kv_cache_memory_bytes", SMALL_KV)
    llm = LLM(str(checkpoint), skip_tokenizer_init=True, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert all(not llm.engine.has_unfinished_requests() for _ in [0])
    pool = llm.engine.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks  # every block came back
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_matches_hf(checkpoint: Path, hf_model: Any) -> None:
    prompts = _prompts()
    expected = [_hf_greedy(hf_model, p) for p in prompts]
    assert _atom_greedy(checkpoint, prompts) == expected


def test_prefill_logits_match_hf(checkpoint: Path, hf_model: Any) -> None:
    prompt = _prompts(seed=2)[-1]
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([prompt])).logits[0]
    llm = LLM(
        str(checkpoint),
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=SMALL_KV,
    )
    model = llm.engine.executor.model
    with torch.no_grad():
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt)))
        logits = model.compute_logits(hidden)
    torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=1e-4)
    # The same logits through the paged cache, chunked, as prompt logprobs.
    params = SamplingParams(max_tokens=1, prompt_logprobs=3)
    llm2 = LLM(
        str(checkpoint),
        skip_tokenizer_init=True,
        max_num_batched_tokens=24,
        long_prefill_token_threshold=24,
        kv_cache_memory_bytes=SMALL_KV,
    )
    out = llm2.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    hf_lp = hf_logits.log_softmax(-1)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        position = out.prompt_logprobs[j]
        assert position is not None
        assert prompt[j] in position
        assert abs(position[prompt[j]].logprob - hf_lp[j - 1, prompt[j]].item()) < 1e-4
        top = hf_lp[j - 1].topk(3).indices.tolist()
        assert set(top) <= set(position)


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {"enable_prefix_caching": False},
        {"max_num_batched_tokens": 16, "long_prefill_token_threshold": 7},  # tiny chunks
        {"num_gpu_blocks_override": 8, "max_model_len": 128, "block_size": 16},  # preemption
        {"max_num_seqs": 2},
    ],
    ids=["no-prefix-cache", "chunked", "preemption", "two-seqs"],
)
def test_engine_knobs_change_no_token(
    checkpoint: Path, hf_model: Any, engine_kwargs: dict[str, Any]
) -> None:
    prompts = _prompts(seed=3)
    prompts += [prompts[-1][:33] + p for p in prompts[:3]]  # shared prefixes: cache hits
    expected = [_hf_greedy(hf_model, p) for p in prompts]
    assert _atom_greedy(checkpoint, prompts, **engine_kwargs) == expected


def test_preemption_really_happens(checkpoint: Path) -> None:
    llm = LLM(
        str(checkpoint), skip_tokenizer_init=True, num_gpu_blocks_override=8, max_model_len=128
    )
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in _prompts(seed=4)], params, use_tqdm=False)
    assert llm.engine.stats().num_preemptions > 0


def test_prefix_cache_is_hit(checkpoint: Path) -> None:
    llm = LLM(str(checkpoint), skip_tokenizer_init=True, kv_cache_memory_bytes=SMALL_KV)
    prompt = _prompts(seed=5)[-1]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    second = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == (len(prompt) - 1) // 16 * 16
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
