"""/v1/chat/completions and /tokenize on the tiny model, through the official openai client."""

from __future__ import annotations

import httpx
import openai

from tests.entrypoints.conftest import MODEL_NAME, assert_error

USER = [{"role": "user", "content": "hi"}]


def chat(client: openai.OpenAI, messages: list[dict] = USER, **kwargs: object) -> object:
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 5)
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, **kwargs)


def test_chat_basic(client: openai.OpenAI) -> None:
    r = chat(client)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    c = r.choices[0]
    assert c.message.role == "assistant" and c.finish_reason == "length" and c.logprobs is None
    assert r.usage.completion_tokens == 5
    # The server's --chat-template with --default-chat-template-kwargs: "hey[user]hi[assistant]"
    assert r.usage.prompt_tokens == len("hey[user]hi[assistant]")


def test_chat_roles_and_content_parts(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "tool", "content": "t", "tool_call_id": "call_1"},
        {"role": "user", "content": "hi"},
    ]
    as_parts = [*messages[:-1], {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert chat(client, messages).choices[0].message.content == (
        chat(client, as_parts).choices[0].message.content
    )


def test_max_completion_tokens_takes_precedence(client: openai.OpenAI) -> None:
    r = chat(client, max_tokens=9, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    full = chat(client, max_tokens=6).choices[0].message.content
    chunks = list(chat(client, max_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full
    plain = list(chat(client, max_tokens=2, stream=True))
    assert plain[-1].usage is None and plain[-1].choices[0].finish_reason == "length"


def test_chat_stream_n(client: openai.OpenAI) -> None:
    texts: dict[int, str] = {}
    roles = set()
    for chunk in chat(client, n=3, max_tokens=4, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.delta.role:
                roles.add(c.index)
    assert roles == {0, 1, 2} and len(set(texts.values())) == 1  # greedy: all the same


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = chat(client, logprobs=True, top_logprobs=3, max_tokens=4)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs)  # greedy
    streamed = list(chat(client, logprobs=True, top_logprobs=1, max_tokens=4, stream=True))
    logprobs = [c.choices[0].logprobs for c in streamed if c.choices[0].logprobs is not None]
    tokens = [t.token for lp in logprobs for t in lp.content]
    assert tokens == [e.token for e in content]


def test_response_format(client: openai.OpenAI, http: httpx.Client) -> None:
    # Accepted; the output is NOT constrained to JSON (no guided decoding).
    for kind in ("json_object", "text"):
        assert chat(client, response_format={"type": kind}).choices[0].message.content
    body = {"model": MODEL_NAME, "messages": USER, "response_format": {"type": "json_schema"}}
    assert_error(http.post("/v1/chat/completions", json=body), 400)


def test_template_kwargs_and_per_request_template(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    base = chat(client, max_tokens=1).usage.prompt_tokens
    r = chat(client, max_tokens=1, extra_body={"chat_template_kwargs": {"greeting": "hello"}})
    assert r.usage.prompt_tokens == base + 2  # "hello" replaces the default "hey"
    own = chat(client, max_tokens=1, extra_body={"chat_template": "{{ messages[0]['content'] }}"})
    assert own.usage.prompt_tokens == 2
    bad = {"model": MODEL_NAME, "messages": USER, "chat_template": "{% if %}"}
    assert_error(http.post("/v1/chat/completions", json=bad), 400)


def test_tokenize_detokenize(http: httpx.Client) -> None:
    r = http.post("/tokenize", json={"prompt": "abc"}).json()
    assert r["count"] == 3 and len(r["tokens"]) == 3 and r["max_model_len"] == 256
    assert (
        http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"].replace(" ", "")
        == "abc"
    )
    msgs = http.post("/tokenize", json={"messages": USER}).json()
    assert msgs["count"] == len("hey[user]hi[assistant]")
    assert_error(http.post("/tokenize", json={}), 400)
    assert_error(http.post("/detokenize", json={"tokens": [10**6]}), 400)


def test_nulls_and_reserved_template_kwargs(client: openai.OpenAI, http: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "messages": USER, "max_tokens": 2}
    nulls = {"n": None, "stream": None, "logprobs": None, "seed": None, "stop": None}
    r = http.post("/v1/chat/completions", json=body | nulls)
    assert r.status_code == 200, r.text
    kwargs = {"chat_template_kwargs": {"add_generation_prompt": False, "tokenize": True}}
    r = http.post("/v1/chat/completions", json=body | kwargs)
    assert r.status_code == 200, r.text
