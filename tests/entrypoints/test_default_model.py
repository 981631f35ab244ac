"""With no --model the server serves the embedded SmolLM2 demo model (a fresh CPU machine runs
it as is); SIGINT stops it and its engine core. Its own server: start-up is most of the time."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.entrypoints.conftest import ServerProcess, metric

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("default-server")
    # Eager: on this CPU compiling for each new batch shape would cost more than it saves.
    proc = ServerProcess(["--enforce-eager", "--level", "0"], tmp / "server.log")
    proc.wait_ready()
    yield proc
    children = proc.stop(signal.SIGINT)
    assert proc.proc.returncode is not None
    assert not children, f"processes left after SIGINT: {children}"


def test_default_model_chat_stream(default_server: ServerProcess) -> None:
    url = default_server.url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    assert model.endswith(".gguf")  # the --model value: the demo model's file
    messages = [{"role": "user", "content": "What is 1+1?"}]
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, max_tokens=4, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    with httpx.Client(base_url=url) as http:
        assert metric(http, "atom:num_free_kv_blocks") == metric(http, "atom:num_total_kv_blocks")


def test_default_model_hundreds_of_streams(default_server: ServerProcess) -> None:
    """200 concurrent greedy streams on the real model: all complete, a sample equals the same
    requests sent one at a time, and every KV block comes back."""
    url = default_server.url
    texts = [f"Name a number between {i} and {i + 10}." for i in range(200)]

    async def run(batch: list[str], concurrent: bool) -> list[str]:
        limits = httpx.Limits(max_connections=len(batch) + 10)
        async with openai.AsyncOpenAI(
            base_url=f"{url}/v1",
            api_key="none",
            max_retries=0,
            http_client=httpx.AsyncClient(limits=limits, timeout=300),
        ) as client:
            model = (await client.models.list()).data[0].id

            async def one(text: str) -> str:
                stream = await client.completions.create(
                    model=model, prompt=text, max_tokens=4, temperature=0, stream=True
                )
                return "".join([c.choices[0].text async for c in stream if c.choices])

            if concurrent:
                return list(await asyncio.gather(*(one(t) for t in batch)))
            return [await one(t) for t in batch]

    together = asyncio.run(run(texts, concurrent=True))
    assert len(together) == 200  # some prompts end at once on EOS: empty text is an answer
    assert asyncio.run(run(texts[::25], concurrent=False)) == together[::25]
    with httpx.Client(base_url=url) as http:
        deadline = time.monotonic() + 20
        while metric(http, "atom:num_free_kv_blocks") != metric(http, "atom:num_total_kv_blocks"):
            assert time.monotonic() < deadline, "KV blocks leaked"
            time.sleep(0.2)


def test_request_templates_need_the_trust_flag(default_server: ServerProcess) -> None:
    with httpx.Client(base_url=default_server.url) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        r = http.post("/v1/chat/completions", json=body | {"chat_template": "{{ 1 }}"})
        assert r.status_code == 400 and "trust-request-chat-template" in r.text
