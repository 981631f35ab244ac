"""Async scheduling (step N+1 scheduled before step N's tokens are back) changes no output.

A tiny random Llama on the CPU runs every workload twice, with and without async scheduling:
greedy and seeded sampling, min_tokens and stop tokens, different max_tokens, n > 1, prompt
logprobs, chunked prefill and forced preemption. The tokens, logprobs (to 1e-3) and finish
reasons must be the same, every KV block must come back, and the async engine must really have
read decode inputs from the device (pending tokens).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from atom import LLM, SamplingParams
from atom.executor.model_runner import ModelRunner


def _prompts(*lens: int) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": [(5 * i + n) % 120 + 2 for i in range(n)]} for n in lens]


WORKLOAD = _prompts(3, 17, 1, 40, 9, 23, 5, 31)
PARAMS = [
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.8, seed=7, max_tokens=30, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0, max_tokens=1),
    SamplingParams(temperature=1.0, seed=3, max_tokens=20, min_tokens=12, stop_token_ids=[5, 9]),
    SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[17, 33, 64], ignore_eos=True),
    SamplingParams(temperature=0.7, seed=11, n=3, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=10, prompt_logprobs=1, ignore_eos=True),
    SamplingParams(temperature=1.2, seed=5, top_k=20, top_p=0.9, max_tokens=40),
]


def _run(path: Path, async_scheduling: bool, **engine: Any) -> tuple[list[Any], int, int]:
    llm = LLM(str(path), skip_tokenizer_init=True, async_scheduling=async_scheduling, **engine)
    runner = llm.engine.executor
    assert isinstance(runner, ModelRunner)
    filled = 0
    fill = runner._fill_pending_inputs

    def counting(pending: list[tuple[int, str]]) -> None:
        nonlocal filled
        filled += len(pending)
        fill(pending)

    runner._fill_pending_inputs = counting  # type: ignore[method-assign]
    outputs = llm.generate(WORKLOAD, PARAMS, use_tqdm=False)
    pool = llm.engine.scheduler.kv.pool
    assert not llm.engine.has_work()
    assert pool.num_free_blocks == pool.num_blocks
    result = [
        (
            [(c.token_ids, c.finish_reason, c.stop_reason, _lp(c.logprobs)) for c in o.outputs],
            _lp(o.prompt_logprobs),
        )
        for o in outputs
    ]
    preemptions = llm.engine.stats().num_preemptions
    llm.shutdown()
    return result, filled, preemptions


def _lp(positions: Any) -> Any:
    """Logprobs as (token ids, values): the values are compared to 1e-3 (batches differ between
    the two modes: a finished request's wasted row takes budget, so float32 sums may differ)."""
    if positions is None:
        return None
    return [None if p is None else (list(p), [lp.logprob for lp in p.values()]) for p in positions]


def _split(result: Any) -> tuple[str, list[float]]:
    """Everything but the logprob values (exact), and the values (approximate)."""
    values: list[float] = []

    def strip(x: Any) -> Any:
        if isinstance(x, list) and x and isinstance(x[0], float):
            values.extend(x)
            return len(x)
        if isinstance(x, list | tuple):
            return [strip(y) for y in x]
        return x

    return repr(strip(result)), values


@pytest.mark.parametrize(
    "engine",
    [
        {"kv_cache_memory_bytes": 4 << 20},
        {"kv_cache_memory_bytes": 4 << 20, "max_num_batched_tokens": 16, "max_num_seqs": 3},
        {"num_gpu_blocks_override": 9, "max_model_len": 128},  # preemptions
    ],
    ids=["default", "chunked-3-seqs", "preemption"],
)
def test_async_scheduling_changes_no_output(tiny: Path, engine: dict[str, Any]) -> None:
    expected, filled_sync, _ = _run(tiny, False, **engine)
    got, filled_async, preemptions = _run(tiny, True, **engine)
    assert filled_sync == 0
    assert preemptions > 0 or "num_gpu_blocks_override" not in engine
    assert filled_async > 100  # decode inputs really came from the device
    exact, values = _split(got)
    assert exact == _split(expected)[0]
    assert values == pytest.approx(_split(expected)[1], abs=1e-3)


def test_penalties_run_steps_one_at_a_time(tiny: Path) -> None:
    """Penalties need the last output token on the host: such batches do not schedule ahead."""
    llm = LLM(str(tiny), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
    params = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3, ignore_eos=True)
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert params.needs_output_history and not plain.needs_output_history
    out = llm.generate(_prompts(4, 9), [params, plain], use_tqdm=False)
    sync = LLM(
        str(tiny), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20, async_scheduling=False
    )
    ref = sync.generate(_prompts(4, 9), [params, plain], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    llm.shutdown()
    sync.shutdown()


@pytest.mark.parametrize("budget", [None, 8])
def test_prompt_logprobs_after_preemption(tiny: Path, budget: int | None) -> None:
    """A request recomputed after a preemption delivers each prompt position once, also when
    its update comes after the next step was scheduled (async)."""
    engine: dict[str, Any] = {"num_gpu_blocks_override": 5, "max_model_len": 64}
    if budget is not None:
        engine["max_num_batched_tokens"] = budget
    params = [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1),
    ]
    results = []
    for async_scheduling in (False, True):
        llm = LLM(str(tiny), skip_tokenizer_init=True, async_scheduling=async_scheduling, **engine)
        out = llm.generate(_prompts(20, 20), params, use_tqdm=False)[1]
        assert llm.engine.stats().num_preemptions > 0
        results.append(([list(p) if p else None for p in out.prompt_logprobs or []], out))
        llm.shutdown()
    (sync_lp, sync_out), (async_lp, async_out) = results
    assert len(async_lp) == len(sync_lp) == 20
    assert async_lp == sync_lp
    assert async_out.outputs[0].token_ids == sync_out.outputs[0].token_ids


def test_a_failed_submit_keeps_the_step_in_flight(tiny: Path) -> None:
    """If queueing step N+1 raises, step N is still collected: no token is lost and the
    request is not left waiting for a pending token forever."""
    from atom.engine.request import Request

    llm = LLM(str(tiny), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
    core, runner = llm.engine, llm.engine.executor
    submit, calls = runner.submit_model, [0]

    def flaky(sched: Any) -> Any:
        calls[0] += 1
        if calls[0] == 4:
            runner._update_states(sched)  # as a failure inside the forward would
            raise RuntimeError("transient")
        return submit(sched)

    runner.submit_model = flaky
    core.add_request(Request("a", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=8)))
    tokens, failures = [], 0
    for _ in range(40):
        if not core.has_work():
            break
        try:
            tokens += [t for o in core.step() for t in o.new_token_ids]
        except RuntimeError:
            failures += 1
    assert failures == 1 and len(tokens) == 8 and not core.has_work()
    llm.shutdown()


def test_a_failed_submit_passes_its_drops_on(tiny: Path) -> None:
    """A submit that fails before the runner reads the step's finished ids: the next step carries
    them, so the runner drops the finished request's state (and its block-table row)."""
    from atom.engine.request import Request

    llm = LLM(str(tiny), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
    core, runner = llm.engine, llm.engine.executor
    submit, failed = runner.submit_model, []

    def flaky(sched: Any) -> Any:
        if "short" in sched.finished_req_ids and not failed:
            failed.append(True)
            raise RuntimeError("transient")  # before the runner saw anything
        return submit(sched)

    runner.submit_model = flaky
    core.add_request(Request("short", [5, 6, 7], SamplingParams(temperature=0, max_tokens=2)))
    core.add_request(Request("long", [5, 6, 8], SamplingParams(temperature=0, max_tokens=12)))
    for _ in range(40):
        if not core.has_work():
            break
        with contextlib.suppress(RuntimeError):
            core.step()
    assert failed and not core.has_work()
    core.step()  # the last drops reach the runner with the next (empty) schedule
    assert "short" not in runner.states
    llm.shutdown()


def test_a_failed_submit_sends_its_new_requests_again(tiny: Path) -> None:
    """A submit that fails before the runner reads the step that admits a request: the next
    step sends the request whole again (not as one the runner knows), and its tokens are those
    of a run without the failure."""
    from atom.engine.request import Request

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def run(fail: bool) -> list[int]:
        llm = LLM(str(tiny), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
        core, runner = llm.engine, llm.engine.executor
        submit, failed = runner.submit_model, []

        def flaky(sched: Any) -> Any:
            if fail and any(r.req_id == "late" for r in sched.new_reqs) and not failed:
                failed.append(True)
                raise RuntimeError("transient")  # before the runner saw anything
            return submit(sched)

        runner.submit_model = flaky
        core.add_request(Request("early", [5, 6, 7], params))
        tokens: list[int] = []
        for i in range(40):
            if i == 2:
                core.add_request(Request("late", [9, 8, 7, 6], params))
            if i > 2 and not core.has_work():
                break
            with contextlib.suppress(RuntimeError):
                tokens += [
                    t for o in core.step() if o.request_id == "late" for t in o.new_token_ids
                ]
        assert failed == ([True] if fail else []) and not core.has_work()
        llm.shutdown()
        return tokens

    expected = run(fail=False)
    assert len(expected) == 6 and run(fail=True) == expected


def test_while_running_runs_between_the_next_submit_and_the_wait(tiny: Path) -> None:
    """step(while_running): the host work runs once step N+1 is queued, before step N's wait;
    when it raises, the scheduler still collects step N (the request runs on to its end; that
    step's token is lost to the caller, which aborts its requests on an error)."""
    from atom.engine.request import Request

    llm = LLM(str(tiny), skip_tokenizer_init=True)
    core, runner = llm.engine, llm.engine.executor
    submit, events = runner.submit_model, []

    def logged(sched: Any) -> Any:
        wait = submit(sched)
        events.append("submit")

        def logged_wait() -> Any:
            events.append("wait")
            return wait()

        return logged_wait

    def work(busy: Any) -> None:
        events.append("work")
        if events.count("work") == 3:
            raise RuntimeError("host work failed")

    runner.submit_model = logged
    core.add_request(Request("a", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=6)))
    tokens, failures = [], 0
    while core.has_work():
        try:
            tokens += [t for o in core.step(work) for t in o.new_token_ids]
        except RuntimeError:
            failures += 1
    assert failures == 1 and len(tokens) == 5 and not core.has_work()
    # From the second step on (one in flight): submit N+1, the work, then N's wait
    assert events[:7] == ["submit", "work", "submit", "work", "wait", "submit", "work"]
    llm.shutdown()


def test_while_running_asks_about_the_step_it_hides_behind(tiny: Path) -> None:
    """busy() in step(while_running) asks the step the engine waits for next (step N, not the
    N+1 just queued) whether it still runs, and is False where none can tell."""
    from atom.engine.request import Request

    llm = LLM(str(tiny), skip_tokenizer_init=True)
    core, runner = llm.engine, llm.engine.executor
    submit, asked = runner.submit_model, []

    class Step:
        def __init__(self, wait: Any, number: int) -> None:
            self.wait, self.number = wait, number

        def __call__(self) -> Any:
            return self.wait()

        def done(self) -> bool:
            asked.append(self.number)
            return self.number % 2 == 0

    count = [0]

    def numbered(sched: Any) -> Any:
        count[0] += 1
        return Step(submit(sched), count[0])

    runner.submit_model = numbered
    core.add_request(Request("a", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=5)))
    seen = []
    while core.has_work():
        core.step(lambda busy: seen.append((count[0], busy())))
    # The first step() queues step 1 and asks it; each later one queues N+1 and asks N
    assert seen[:4] == [(1, True), (2, True), (3, False), (4, True)]
    assert asked[:4] == [1, 1, 2, 3]
    runner.submit_model = lambda sched: submit(sched).__call__  # a plain function: no done()
    core.add_request(Request("b", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3)))
    busy = []
    while core.has_work():
        core.step(lambda b: busy.append(b()))
    assert busy and not any(busy)
    llm.shutdown()
