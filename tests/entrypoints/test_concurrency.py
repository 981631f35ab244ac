"""200 concurrent streams on the tiny model: all complete, each equals the same request sent alone
(a sample of 50),
and no KV block is left allocated afterwards."""

from __future__ import annotations

import asyncio

import httpx
import openai

from tests.entrypoints.conftest import API_KEY, MODEL_NAME, ServerProcess, metric

NUM_REQUESTS = 200
MAX_TOKENS = 8


def prompts() -> list[str]:
    return [f"Count from {i} to {i + 5}:" for i in range(NUM_REQUESTS)]


async def stream_one(client: openai.AsyncOpenAI, prompt: str) -> str:
    stream = await client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])


async def run_all(url: str, texts: list[str], concurrent: bool) -> list[str]:
    limits = httpx.Limits(max_connections=NUM_REQUESTS + 10)
    async with openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key=API_KEY,
        max_retries=0,
        http_client=httpx.AsyncClient(limits=limits, timeout=120),
    ) as client:
        if concurrent:
            return list(await asyncio.gather(*(stream_one(client, t) for t in texts)))
        return [await stream_one(client, t) for t in texts]


def test_concurrent_streams_match_sequential(server: ServerProcess, http: httpx.Client) -> None:
    texts = prompts()
    concurrent = asyncio.run(run_all(server.url, texts, concurrent=True))
    assert all(concurrent)
    # One at a time: every 4th request is enough to show that batching changes no token.
    sequential = asyncio.run(run_all(server.url, texts[::4], concurrent=False))
    assert concurrent[::4] == sequential
    # The stats come with engine steps: one more request makes them current.
    http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 1})
    assert metric(http, "atom:num_free_kv_blocks") == metric(http, "atom:num_total_kv_blocks")
    assert metric(http, "atom:num_requests_running") == 0
