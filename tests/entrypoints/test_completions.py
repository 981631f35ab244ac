"""/v1/completions end to end on the tiny model, through the official openai client."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.entrypoints.conftest import MODEL_NAME


# ---- completions ----
def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]


def test_completion_basic_and_usage(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="hello", max_tokens=5, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 5
    assert r.usage.total_tokens == 10 and r.usage.prompt_tokens_details.cached_tokens >= 0
    again = client.completions.create(model=MODEL_NAME, prompt="hello", max_tokens=5, temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic
    assert again.usage.prompt_tokens_details.cached_tokens == 0  # prompt < one full block


def test_completion_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL_NAME, prompt="abc", temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 16


def test_completion_batch_and_token_ids(client: openai.OpenAI, http: httpx.Client) -> None:
    ids = http.post("/tokenize", json={"prompt": "xyz"}).json()["tokens"]
    one = client.completions.create(model=MODEL_NAME, prompt="xyz", max_tokens=3, temperature=0)
    r = client.completions.create(
        model=MODEL_NAME, prompt=["abc", "xyz"], max_tokens=3, temperature=0, n=2
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[2] == by_index[3] == one.choices[0].text
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 12
    r_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=3, temperature=0)
    assert r_ids.choices[0].text == one.choices[0].text
    r_batch = client.completions.create(
        model=MODEL_NAME, prompt=[ids, ids], max_tokens=3, temperature=0
    )
    assert [c.text for c in r_batch.choices] == [one.choices[0].text] * 2


def test_completion_sampling_options_and_seed(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL_NAME, prompt="seed", max_tokens=8, temperature=1.0, seed=7)
    extra = {"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True}
    a = client.completions.create(**kwargs, top_p=0.9, presence_penalty=0.5, extra_body=extra)
    b = client.completions.create(**kwargs, top_p=0.9, presence_penalty=0.5, extra_body=extra)
    assert a.choices[0].text == b.choices[0].text
    assert a.usage.completion_tokens == 8


def test_completion_stop_string(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL_NAME, prompt="stop", max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text.strip()[3:5] if len(text.strip()) >= 5 else text.strip()[-1]
    r = client.completions.create(
        model=MODEL_NAME, prompt="stop", max_tokens=12, temperature=0, stop=[stop]
    )
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert text.startswith(r.choices[0].text)


def test_completion_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL_NAME, prompt="abc", max_tokens=4, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and top[token] == logprob and 2 <= len(top) <= 3
        assert logprob == pytest.approx(max(top.values()))  # greedy picks the top token
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_with_zero_max_tokens_gives_prompt_logprobs(client: openai.OpenAI) -> None:
    """lm-eval's loglikelihood request: the prompt back, with one logprob per prompt token."""
    r = client.completions.create(
        model=MODEL_NAME, prompt="hello world", max_tokens=0, echo=True, logprobs=1
    )
    c = r.choices[0]
    assert c.text == "hello world" and r.usage.completion_tokens == 0
    assert len(c.logprobs.tokens) == len(c.logprobs.text_offset) == 11
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in c.logprobs.token_logprobs[1:])
    echoed = client.completions.create(
        model=MODEL_NAME, prompt="hello world", max_tokens=2, echo=True, temperature=0
    )
    assert echoed.choices[0].text.startswith("hello world")


def test_streamed_echo_logprobs_of_a_chunked_prompt(client: openai.OpenAI) -> None:
    """150 prompt tokens prefill in 64-token steps: the stream's echo waits for all of them."""
    prompt = "abcdefghij" * 15
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(**kwargs, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    logprobs = [x for c in chunks if c.choices for x in c.choices[0].logprobs.token_logprobs]
    assert text == whole.text == prompt
    assert logprobs == whole.logprobs.token_logprobs and len(logprobs) == 150


def test_completion_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL_NAME, prompt="abc", max_tokens=6, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt="abc",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    text = "".join(c.choices[0].text for c in chunks[:-1])
    assert text == full.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.id == chunks[0].id for c in chunks)


def test_completion_stream_batch_n(client: openai.OpenAI) -> None:
    texts: dict[int, str] = {}
    for chunk in client.completions.create(
        model=MODEL_NAME, prompt=["ab", "cd"], n=2, max_tokens=3, temperature=0, stream=True
    ):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert sorted(texts) == [0, 1, 2, 3] and texts[0] == texts[1] and texts[2] == texts[3]
