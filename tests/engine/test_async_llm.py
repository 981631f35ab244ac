"""AsyncLLM: the engine core in its own process, driven from asyncio (tiny random Llama)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

from atom.args import EngineArgs
from atom.engine.async_llm import AsyncLLM, EngineDeadError
from atom.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsyncLLM]:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    args = EngineArgs(model=str(path), skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 20)
    llm = AsyncLLM(args)
    yield llm
    llm.shutdown()


def _prompt(n: int) -> dict[str, list[int]]:
    return {"prompt_token_ids": [(7 * i) % 120 + 1 for i in range(n)]}


async def _collect(llm: AsyncLLM, request_id: str, n: int = 5) -> list[int]:
    last = None
    async for out in llm.generate(_prompt(n), GREEDY, request_id):
        last = out
    assert last is not None and last.finished
    return last.outputs[0].token_ids


def test_concurrent_requests_match_sequential(engine: AsyncLLM) -> None:
    async def run() -> tuple[list[list[int]], list[list[int]]]:
        alone = [await _collect(engine, f"s{i}", 3 + i) for i in range(6)]
        together = await asyncio.gather(*[_collect(engine, f"c{i}", 3 + i) for i in range(6)])
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert alone == together and all(len(t) == 6 for t in alone)


def test_early_close_aborts_and_frees_blocks(engine: AsyncLLM) -> None:
    async def run() -> None:
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        gen = engine.generate(_prompt(20), params, "long")
        async for _ in gen:
            break
        await gen.aclose()
        for _ in range(100):  # the abort reaches the core; its next stats show the blocks back
            await engine.check_health()
            if engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.02)

    asyncio.run(run())
    stats = engine.stats()
    assert stats.num_running == 0 and stats.kv_cache_usage == 0.0


def test_bad_input_and_duplicate_ids(engine: AsyncLLM) -> None:
    async def run() -> None:
        with pytest.raises(ValueError, match="vocabulary"):
            await anext(engine.generate({"prompt_token_ids": [999]}, GREEDY, "bad"))
        two = SamplingParams(n=2, max_tokens=50, ignore_eos=True)
        gen = engine.generate(_prompt(4), two, "x")
        await anext(gen)
        with pytest.raises(ValueError, match="already running"):
            await anext(engine.generate(_prompt(4), GREEDY, "x"))
        # A caller id that looks like a child id of "x" ("<i>_<id>") runs on its own.
        assert len(await _collect(engine, "1_x")) == 6
        await gen.aclose()
        assert await _collect(engine, "after") == await _collect(engine, "again")

    asyncio.run(run())


def test_reused_id_after_abort_runs(engine: AsyncLLM) -> None:
    async def run() -> list[int]:
        params = SamplingParams(max_tokens=100, ignore_eos=True)
        gen = engine.generate(_prompt(4), params, "a")
        await anext(gen)
        await engine.abort("a")
        tokens = await _collect(engine, "a")
        with pytest.raises(asyncio.CancelledError):
            await anext(gen)
        return tokens

    assert len(asyncio.run(run())) == 6


def test_utility_calls(engine: AsyncLLM) -> None:
    async def run() -> None:
        await engine.check_health()
        assert await engine.reset_prefix_cache() is True
        with pytest.raises(ValueError, match="torch-profiler-dir"):
            await engine.start_profile()

    asyncio.run(run())


def test_shutdown_ends_waiters_and_the_process(tmp_path: Path, engine: AsyncLLM) -> None:
    llm = AsyncLLM(EngineArgs(model=engine.config.model.model, skip_tokenizer_init=True))
    pid = llm._proc.pid

    async def run() -> None:
        gen = llm.generate(_prompt(4), SamplingParams(max_tokens=200, ignore_eos=True), "w")
        await anext(gen)
        llm.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in gen:
                pass

    asyncio.run(run())
    assert pid is not None
    assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def test_a_lagging_consumer_gets_one_coalesced_output() -> None:
    """Outputs queued while the consumer was busy come as the newest one, with the delta texts
    joined; a finished output or an error is never merged past."""
    from atom.engine.async_llm import _coalesce
    from atom.outputs import CompletionOutput, RequestMetrics, RequestOutput

    def out(text: str, delta: str, finished: bool = False) -> RequestOutput:
        completion = CompletionOutput(0, text, list(range(len(text))), None, None, delta_text=delta)
        return RequestOutput("r", None, [1], None, [completion], finished, RequestMetrics(0.0))

    queue: asyncio.Queue = asyncio.Queue()
    for item in (out("ab", "b"), out("abc", "c"), out("abcd", "d", finished=True), out("x", "x")):
        queue.put_nowait(item)
    merged = _coalesce(out("a", "a"), queue)
    assert isinstance(merged, RequestOutput) and merged.finished
    assert merged.outputs[0].delta_text == "abcd" and merged.outputs[0].text == "abcd"
    assert queue.qsize() == 1  # what came after the final output stays queued
    error = RuntimeError("aborted")
    queue = asyncio.Queue()
    queue.put_nowait(error)
    assert _coalesce(out("a", "a"), queue) is error
