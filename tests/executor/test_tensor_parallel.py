"""Tensor parallelism on the CPU (gloo): tp=2 gives the tokens tp=1 gives."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import random
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers

from atom import LLM, SamplingParams
from atom.engine.outputs import ModelRunnerOutput
from atom.executor.worker import _CountedWait, _QueuedSteps
from tests.conftest import tiny_llama_config

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [(5 * i + n) % 90 + 3 for i in range(n)]} for n in (3, 17, 40)]


def _tokens(path: Path, **kwargs: Any) -> list[list[int]]:
    llm = LLM(str(path), skip_tokenizer_init=True, kv_cache_memory_bytes=8 << 20, **kwargs)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    finally:
        llm.shutdown()


@pytest.mark.parametrize(
    ("cls", "num_kv_heads"),
    [(transformers.LlamaConfig, 2), (transformers.Qwen3Config, 1)],  # 1: KV heads replicated
    ids=["llama", "qwen3-replicated-kv"],
)
def test_tp2_matches_tp1(tmp_path: Path, cls: Any, num_kv_heads: int) -> None:
    torch.manual_seed(0)
    config = cls(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=16,
        vocab_size=101,  # uneven vocabulary shards
        max_position_embeddings=256,
        initializer_range=0.2,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    assert _tokens(tmp_path, tensor_parallel_size=2) == _tokens(tmp_path)


def test_tp2_queued_steps_match_tp1(tmp_path: Path) -> None:
    """Steps queued ahead (async scheduling) and steps waited for first (a penalty needs every
    output on the host) in one run: the workers interleave their waits as rank 0 does, so seeded
    draws, penalties and greedy rows give tp=1's tokens. Then a worker dies: the next generate
    raises, and shutdown leaves the process group at once."""
    torch.manual_seed(1)
    config = tiny_llama_config(hidden_size=64, intermediate_size=96, vocab_size=97)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    prompts = [{"prompt_token_ids": [(3 * i + n) % 90 + 3 for i in range(n)]} for n in (5, 9, 30)]
    # The penalty's 4 tokens run one step at a time; the rest are queued ahead.
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=7, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=4, ignore_eos=True),
    ]

    def engine(**kwargs: Any) -> LLM:
        return LLM(str(tmp_path), skip_tokenizer_init=True, kv_cache_memory_bytes=8 << 20, **kwargs)

    def tokens(llm: LLM) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    one = engine()
    want = tokens(one)
    one.shutdown()
    assert [len(t) for t in want] == [20, 14, 4]
    two = engine(tensor_parallel_size=2)
    try:
        assert tokens(two) == want
        # A worker that died is reported at the next step, and shutdown does not wait for it.
        worker = two.engine.executor.workers[0]  # type: ignore[attr-defined]
        worker.kill()
        worker.join()
        with pytest.raises(RuntimeError, match="workers exited"):
            tokens(two)
        # Nor does the runner's graph release wait for the device (a replay may wait for the
        # dead rank forever).
        runner = two.engine.executor.runner  # type: ignore[attr-defined]
        plain_shutdown, syncs = runner.shutdown, []
        runner.shutdown = lambda sync=True: (syncs.append(sync), plain_shutdown(sync))[1]
    finally:
        two.shutdown()
    assert not torch.distributed.is_initialized() and syncs == [False]


@pytest.mark.parametrize("seed", range(5))
def test_workers_wait_in_rank0s_order(seed: int) -> None:
    """The protocol alone: rank 0 queues steps ahead or waits first, as EngineCore.step does
    (an empty step is waited for at once, before the step in flight; one wait fails); a worker
    replaying the ExecuteModel commands submits and waits in rank 0's order."""
    rng = random.Random(seed)
    rank0: list[tuple[str, int]] = []
    worker: list[tuple[str, int]] = []
    executor = SimpleNamespace(waited=0)
    in_flight: list[_CountedWait] = []
    sent: list[tuple[int, int, bool]] = []  # (step, waited, empty) of each ExecuteModel
    failing = -1  # the first non-empty step past 5 fails its wait

    def step_wait(log: list[tuple[str, int]], k: int) -> Callable[[], ModelRunnerOutput]:
        def wait() -> ModelRunnerOutput:
            log.append(("wait", k))
            if k == failing:
                raise RuntimeError("a failed step")
            return ModelRunnerOutput()

        return wait

    def wait_oldest() -> None:
        with contextlib.suppress(RuntimeError):
            in_flight.pop(0)()

    for k in range(60):
        if in_flight and rng.random() < 0.3:  # a penalty: collect step N before scheduling N+1
            wait_oldest()
        empty = rng.random() < 0.15
        sent.append((k, executor.waited, empty))
        rank0.append(("submit", k))
        if empty:
            step_wait(rank0, k)()  # as MultiprocExecutor.submit_model returns it: not counted
            continue
        if failing < 0 and k > 5:
            failing = k
        in_flight.append(_CountedWait(step_wait(rank0, k), executor))  # type: ignore[arg-type]
        while len(in_flight) > 1:
            wait_oldest()
    while in_flight:
        wait_oldest()

    steps = _QueuedSteps(rank=1)
    for k, waited, empty in sent:  # _worker_main's ExecuteModel branch
        steps.wait_until(waited)
        worker.append(("submit", k))
        if empty:
            step_wait(worker, k)()
        else:
            steps.waits.append(step_wait(worker, k))
    steps.wait_all()
    assert worker == rank0
    assert ("wait", failing) in worker


def test_tp_failed_start_leaves_no_workers(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=512,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    for _ in range(2):  # the second start would fail if the first had leaked its process group
        with pytest.raises(ValueError, match="max_model_len"):
            LLM(
                str(tmp_path),
                skip_tokenizer_init=True,
                tensor_parallel_size=2,
                num_gpu_blocks_override=2,
            )
    assert not torch.distributed.is_initialized()
    assert not [p for p in mp.active_children() if p.name.startswith("atom-tp")]


@pytest.mark.parametrize("device_fails", [False, True])
def test_nccl_group_is_aborted_after_a_sync(
    monkeypatch: pytest.MonkeyPatch, device_fails: bool
) -> None:
    """An NCCL group is left by abort, once the device has finished its work (or failed):
    NCCL's finalize (destroy_process_group) would wait forever for a rank that died. (A
    one-rank gloo group stands in, told it is NCCL.)"""
    import torch.distributed as dist

    from atom.distributed import free_port, leave_tensor_parallel

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    calls: list[str] = []

    def synchronize(*args: object) -> None:
        calls.append("sync")
        if device_fails:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: calls.append("destroy"))
    try:
        leave_tensor_parallel()
        assert calls == ["sync"] and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            destroy()
