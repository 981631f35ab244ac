"""Scheduler: token budget, chunking, admission, preemption and stop conditions, driven by a fake
runner. Block size 16 throughout (CacheConfig accepts 1 or multiples of 16)."""

from __future__ import annotations

import pytest

from atom.engine.outputs import (
    CachedRequestData,
    EngineCoreOutput,
    NewRequestData,
    SchedulerOutput,
)
from atom.engine.request import RequestStatus
from atom.engine.scheduler import Scheduler

from .fake_runner import (
    FakeRunner,
    generated,
    make_request,
    make_scheduler,
    run_to_completion,
    step,
)


def ref_counts(scheduler: Scheduler) -> list[int]:
    return [b.ref_cnt for b in scheduler.kv.pool.blocks]


def all_free(scheduler: Scheduler) -> bool:
    pool = scheduler.kv.pool
    return pool.num_free_blocks == pool.num_blocks and not any(ref_counts(scheduler))


# ---- construction and input checks ----
def test_constructor_rejects_a_cache_smaller_than_max_model_len() -> None:
    with pytest.raises(ValueError, match=r"holds 112 tokens, fewer than max_model_len=128"):
        make_scheduler(7, max_model_len=128)
    assert make_scheduler(8, max_model_len=128).kv.num_blocks == 8


def test_add_request_errors() -> None:
    scheduler = make_scheduler(8, max_model_len=64)
    with pytest.raises(ValueError, match="the prompt is empty"):
        scheduler.add_request(make_request("empty", []))
    with pytest.raises(ValueError, match="65 tokens, more than max_model_len=64"):
        scheduler.add_request(make_request("long", 65))
    scheduler.add_request(make_request("a", 64))
    with pytest.raises(ValueError, match="'a' is already in use"):
        scheduler.add_request(make_request("a", 3))
    assert [r.request_id for r in scheduler.waiting] == ["a"]
    assert list(scheduler.requests) == ["a"]


def test_schedule_with_nothing_to_do() -> None:
    scheduler = make_scheduler()
    sched = scheduler.schedule()
    assert sched.is_empty
    assert (sched.new_reqs, sched.cached_reqs, sched.finished_req_ids) == ([], [], set())
    assert not scheduler.has_unfinished_requests()


# ---- the token budget ----
def test_chunked_prefill_chunk_sizes_and_block_ids() -> None:
    scheduler = make_scheduler(16, max_num_batched_tokens=32, max_model_len=128)
    runner = FakeRunner(scheduler)
    prompt = make_request("a", 80, max_tokens=3)
    scheduler.add_request(prompt)

    sched, out = step(scheduler, runner)
    assert sched.new_reqs == [
        NewRequestData("a", prompt.prompt_token_ids, [], prompt.sampling_params, [0, 1], 0)
    ]
    assert (sched.num_scheduled_tokens, sched.total_num_scheduled_tokens, out) == (
        {"a": 32},
        32,
        {},
    )

    expected = [  # (new block ids, computed before the step, scheduled, sampled)
        ([2, 3], 32, 32, []),
        ([4], 64, 16, [1000]),
        ([5], 80, 1, [1001]),  # token 81 opens block 5
        ([], 81, 1, [1002]),
    ]
    for new_block_ids, num_computed, num_scheduled, sampled in expected:
        sched, out = step(scheduler, runner)
        assert sched.new_reqs == []
        assert sched.cached_reqs == [CachedRequestData("a", new_block_ids, num_computed)]
        assert sched.num_scheduled_tokens == {"a": num_scheduled}
        assert (out["a"].new_token_ids if out else []) == sampled
    assert out["a"].finish_reason == "length"
    assert all_free(scheduler)
    stats = scheduler.stats()  # the stats line's totals: three chunks, three sampled tokens
    assert (stats.num_prompt_tokens, stats.num_generation_tokens) == (80, 3)

    sched = scheduler.schedule()
    assert sched.finished_req_ids == {"a"}
    assert sched.is_empty


def test_prefill_and_decode_mix_in_one_step() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=32)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 20))
    scheduler.add_request(make_request("b", 40))

    sched, out = step(scheduler, runner)
    assert [r.req_id for r in sched.new_reqs] == ["a", "b"]
    assert [r.block_ids for r in sched.new_reqs] == [[0, 1], [2]]
    assert sched.num_scheduled_tokens == {"a": 20, "b": 12}
    assert list(out) == ["a"]  # b is mid-prefill

    sched, out = step(scheduler, runner)  # a decodes while b finishes its prompt
    assert sched.cached_reqs == [CachedRequestData("a", [], 20), CachedRequestData("b", [3, 4], 12)]
    assert sched.num_scheduled_tokens == {"a": 1, "b": 28}
    assert sched.total_num_scheduled_tokens == 29
    assert {k: v.new_token_ids for k, v in out.items()} == {"a": [1001], "b": [1000]}

    sched, _ = step(scheduler, runner)
    assert sched.num_scheduled_tokens == {"a": 1, "b": 1}


def test_new_request_joins_running_decodes() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=32)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 20))
    step(scheduler, runner)
    scheduler.add_request(make_request("b", 40))
    sched, _ = step(scheduler, runner)
    assert [r.req_id for r in sched.cached_reqs] == ["a"]
    assert [(r.req_id, r.block_ids, r.num_computed_tokens) for r in sched.new_reqs] == [
        ("b", [2, 3], 0)
    ]
    assert sched.num_scheduled_tokens == {"a": 1, "b": 31}


def test_stats_count_a_one_token_last_chunk_as_prompt() -> None:
    scheduler = make_scheduler(16, max_num_batched_tokens=32, max_model_len=128)
    scheduler.add_request(make_request("a", 33, max_tokens=2))
    run_to_completion(scheduler, FakeRunner(scheduler))  # chunks of 32 and 1, then a decode
    stats = scheduler.stats()
    assert (stats.num_prompt_tokens, stats.num_generation_tokens) == (33, 2)


def test_long_prefill_token_threshold_caps_each_chunk() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=16)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 40))
    scheduler.add_request(make_request("b", 40))
    chunks = [step(scheduler, runner)[0].num_scheduled_tokens for _ in range(4)]
    assert chunks == [
        {"a": 16, "b": 16},
        {"a": 16, "b": 16},
        {"a": 8, "b": 8},
        {"a": 1, "b": 1},
    ]


def test_without_chunked_prefill_a_prompt_waits_for_room() -> None:
    scheduler = make_scheduler(
        max_num_batched_tokens=64, max_model_len=64, enable_chunked_prefill=False
    )
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 40))
    scheduler.add_request(make_request("b", 40))
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"a": 40}
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"a": 1, "b": 40}


def test_max_num_seqs_caps_the_running_set() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 16, max_tokens=1))
    scheduler.add_request(make_request("b", 16))
    scheduler.add_request(make_request("c", 16))

    sched, out = step(scheduler, runner)
    assert sched.num_scheduled_tokens == {"a": 16, "b": 16}
    assert [r.request_id for r in scheduler.waiting] == ["c"]
    assert out["a"].finish_reason == "length"

    sched, _ = step(scheduler, runner)
    assert sched.finished_req_ids == {"a"}
    # b's 17th token takes block 2 first; a's freed block 0 went to the tail of the queue.
    assert sched.cached_reqs == [CachedRequestData("b", [2], 16)]
    assert [(r.req_id, r.block_ids) for r in sched.new_reqs] == [("c", [3])]
    assert sched.num_scheduled_tokens == {"b": 1, "c": 16}


def test_fcfs_a_blocked_head_blocks_the_queue() -> None:
    scheduler = make_scheduler(8, max_model_len=128)
    runner = FakeRunner(scheduler)
    for req_id, n in (("a", 100), ("b", 64), ("c", 10)):
        scheduler.add_request(make_request(req_id, n))

    sched, _ = step(scheduler, runner)
    assert [(r.req_id, r.block_ids) for r in sched.new_reqs] == [("a", [0, 1, 2, 3, 4, 5, 6])]
    # c would fit in the one free block, but b came first.
    sched, _ = step(scheduler, runner)
    assert sched.new_reqs == []
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]

    scheduler.finish_requests(["a"])
    sched, _ = step(scheduler, runner)
    # a's blocks were freed tail first: [6, 5, ..., 0] after the never-used block 7.
    assert [(r.req_id, r.block_ids) for r in sched.new_reqs] == [("b", [7, 6, 5, 4]), ("c", [3])]
    assert sched.finished_req_ids == {"a"}


# ---- preemption ----
def test_preemption_of_the_newest_request_and_its_recompute() -> None:
    scheduler = make_scheduler(8, max_model_len=128)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 48, max_tokens=20))
    scheduler.add_request(make_request("b", 48, max_tokens=30))
    b = scheduler.requests["b"]
    outputs: dict[str, list[int]] = {"a": [], "b": [], "c": []}

    def run(n: int) -> tuple[SchedulerOutput, dict[str, EngineCoreOutput]]:
        for _ in range(n):
            sched, out = step(scheduler, runner)
            for req_id, o in out.items():
                outputs[req_id] += o.new_token_ids
        return sched, out

    run(9)
    scheduler.add_request(make_request("c", 16))  # the pool is full: c waits
    run(8)
    # Step 17 filled each request's fourth block: a [0, 1, 2, 6], b [3, 4, 5, 7].
    assert scheduler.kv.block_ids("a") == [0, 1, 2, 6]
    assert scheduler.kv.block_ids("b") == [3, 4, 5, 7]
    assert b.num_tokens == 65

    # Step 18: a needs a fifth block; b, the newest, is preempted and its last block reused.
    sched, out = run(1)
    assert sched.cached_reqs == [CachedRequestData("a", [7], 64)]
    assert sched.new_reqs == []  # a step that preempts admits nobody
    assert sched.finished_req_ids == {"b"}
    assert list(out) == ["a"]
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert [r.request_id for r in scheduler.waiting] == ["b", "c"]
    assert scheduler.stats().num_preemptions == 1
    assert ref_counts(scheduler) == [1, 1, 1, 0, 0, 0, 1, 1]

    # Steps 19-20: b's cached blocks 3, 4, 5 are free but b needs two more; a then finishes.
    run(2)
    assert scheduler.waiting[0] is b

    # Step 21: b comes back with its outputs, its three cached blocks and two of a's.
    sched, out = run(1)
    assert sched.finished_req_ids == {"a"}
    assert sched.new_reqs[0] == NewRequestData(
        "b", b.prompt_token_ids, list(range(1000, 1017)), b.sampling_params, [3, 4, 5, 7, 6], 48
    )
    assert [(r.req_id, r.block_ids, r.num_computed_tokens) for r in sched.new_reqs[1:]] == [
        ("c", [2], 0)
    ]
    assert sched.num_scheduled_tokens == {"b": 17, "c": 16}
    assert {k: v.new_token_ids for k, v in out.items()} == {"b": [1017], "c": [1000]}
    assert out["b"].num_cached_tokens == 0  # the hit at first scheduling, not the recompute's

    run(50)
    assert not scheduler.has_unfinished_requests()
    # Preemption changes no token and delivers none twice.
    assert outputs == {
        "a": list(range(1000, 1020)),
        "b": list(range(1000, 1030)),
        "c": list(range(1000, 1016)),
    }
    assert all_free(scheduler)


def test_the_newest_request_preempts_itself() -> None:
    scheduler = make_scheduler(8, max_model_len=128)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 50))
    scheduler.add_request(make_request("b", 64))
    step(scheduler, runner)  # 4 + 4 blocks
    sched, _ = step(scheduler, runner)  # b's 65th token needs a ninth block
    assert sched.num_scheduled_tokens == {"a": 1}
    assert sched.finished_req_ids == {"b"}
    assert scheduler.requests["b"].status == RequestStatus.PREEMPTED
    assert [r.request_id for r in scheduler.running] == ["a"]
    assert ref_counts(scheduler) == [1, 1, 1, 1, 0, 0, 0, 0]


def test_a_step_that_preempts_admits_nobody() -> None:
    scheduler = make_scheduler(
        8, max_model_len=128, max_num_batched_tokens=48, enable_prefix_caching=False
    )
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 48))
    step(scheduler, runner)
    scheduler.add_request(make_request("b", 80))
    sched, _ = step(scheduler, runner)
    assert sched.num_scheduled_tokens == {"a": 1, "b": 47}
    assert scheduler.kv.block_ids("b") == [4, 5, 6]

    # b's last 33 tokens need two more blocks, one is free: b preempts itself. The 4 free
    # blocks would take a fresh 47-token chunk of b, but b waits for the next step.
    sched, _ = step(scheduler, runner)
    assert sched.num_scheduled_tokens == {"a": 1}
    assert (sched.new_reqs, sched.finished_req_ids) == ([], {"b"})
    assert scheduler.kv.pool.num_free_blocks == 4

    sched, _ = step(scheduler, runner)
    assert [(r.req_id, r.block_ids, r.num_computed_tokens) for r in sched.new_reqs] == [
        ("b", [7, 6, 5], 0)
    ]
    assert sched.num_scheduled_tokens == {"a": 1, "b": 47}


# ---- stop conditions ----
@pytest.mark.parametrize(
    ("params", "script", "tokens", "finish_reason", "stop_reason"),
    [
        ({}, [5, 6, 2, 7], [5, 6, 2], "stop", None),  # EOS
        ({"stop_token_ids": [7]}, [5, 7, 2], [5, 7], "stop", 7),
        ({"stop_token_ids": [2]}, [5, 2], [5, 2], "stop", 2),  # EOS listed as a stop token
        ({"ignore_eos": True, "max_tokens": 3}, [2, 2, 2, 2], [2, 2, 2], "length", None),
        ({"ignore_eos": True, "stop_token_ids": [7]}, [2, 7], [2, 7], "stop", 7),
        ({"min_tokens": 2}, [2, 2, 5], [2, 2], "stop", None),
        ({"min_tokens": 3, "stop_token_ids": [7]}, [7, 2, 7, 5], [7, 2, 7], "stop", 7),
        ({"max_tokens": 4}, [], [1000, 1001, 1002, 1003], "length", None),
        ({"max_tokens": 1}, [2], [2], "stop", None),  # a stop beats the length limit
    ],
)
def test_stop_conditions(
    params: dict[str, object],
    script: list[int],
    tokens: list[int],
    finish_reason: str,
    stop_reason: int | None,
) -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler, script={"a": script})
    scheduler.add_request(make_request("a", 20, eos=[2], **params))
    req = scheduler.requests["a"]
    outputs = run_to_completion(scheduler, runner)["a"]
    assert generated(outputs) == tokens
    assert all(not o.finished for o in outputs[:-1])
    assert (outputs[-1].finish_reason, outputs[-1].stop_reason) == (finish_reason, stop_reason)
    assert req.status.finish_reason == finish_reason
    assert all_free(scheduler)
    assert scheduler.requests == {}


@pytest.mark.parametrize(("prompt_len", "num_generated"), [(30, 2), (31, 1), (32, 1)])
def test_max_model_len_caps_generation(prompt_len: int, num_generated: int) -> None:
    scheduler = make_scheduler(2, max_model_len=32)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", prompt_len, max_tokens=None))
    outputs = run_to_completion(scheduler, runner)["a"]
    assert generated(outputs) == list(range(1000, 1000 + num_generated))
    assert outputs[-1].finish_reason == "length"
    assert all_free(scheduler)


# ---- finishing from outside ----
def test_abort_frees_running_and_waiting_requests() -> None:
    scheduler = make_scheduler(8, max_model_len=128, max_num_seqs=1)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 40))
    scheduler.add_request(make_request("b", 40))
    step(scheduler, runner)
    a, b = scheduler.requests["a"], scheduler.requests["b"]
    assert scheduler.kv.block_ids("a") == [0, 1, 2]

    scheduler.finish_requests(["a", "b", "unknown"])
    assert (a.status, b.status) == (RequestStatus.FINISHED_ABORTED,) * 2
    assert (scheduler.running, list(scheduler.waiting), scheduler.requests) == ([], [], {})
    assert all_free(scheduler)
    assert not scheduler.has_unfinished_requests()
    sched = scheduler.schedule()
    assert sched.finished_req_ids == {"a", "b"}
    assert sched.is_empty


def test_finish_between_schedule_and_update() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", 20))
    scheduler.add_request(make_request("b", 20))
    step(scheduler, runner)
    sched = scheduler.schedule()
    result = runner.execute(sched)
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)  # a stop string, say
    outputs = scheduler.update_from_output(sched, result)
    assert [(o.request_id, o.new_token_ids) for o in outputs] == [("b", [1001])]
    assert scheduler.kv.block_ids("a") == []
    assert [r.request_id for r in scheduler.running] == ["b"]
    assert scheduler.schedule().finished_req_ids == {"a"}


# ---- prefix sharing ----
def test_same_prompt_requests_share_prompt_blocks() -> None:
    scheduler = make_scheduler(8, max_model_len=128)
    runner = FakeRunner(scheduler)
    prompt = list(range(40))
    scheduler.add_request(make_request("a", prompt))
    scheduler.add_request(make_request("b", prompt))

    sched, out = step(scheduler, runner)
    assert [(r.req_id, r.block_ids, r.num_computed_tokens) for r in sched.new_reqs] == [
        ("a", [0, 1, 2], 0),
        ("b", [0, 1, 3], 32),
    ]
    assert sched.num_scheduled_tokens == {"a": 40, "b": 8}
    assert ref_counts(scheduler) == [2, 2, 1, 1, 0, 0, 0, 0]
    assert (out["a"].num_cached_tokens, out["b"].num_cached_tokens) == (0, 32)
    stats = scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (80, 32)
    assert stats.num_prompt_tokens == 48  # the prefix cache's 32 tokens were not computed
    assert (stats.num_running, stats.num_waiting, stats.num_free_blocks) == (2, 0, 4)
    assert stats.kv_cache_usage == 0.5

    scheduler.finish_requests(["a"])
    assert ref_counts(scheduler) == [1, 1, 0, 1, 0, 0, 0, 0]

    # A later request with the prompt hits the two full blocks b still holds.
    scheduler.add_request(make_request("c", prompt))
    sched, _ = step(scheduler, runner)
    assert [(r.req_id, r.block_ids, r.num_computed_tokens) for r in sched.new_reqs] == [
        ("c", [0, 1, 4], 32)
    ]


def test_no_sharing_without_prefix_caching() -> None:
    scheduler = make_scheduler(8, max_model_len=128, enable_prefix_caching=False)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("a", list(range(40))))
    scheduler.add_request(make_request("b", list(range(40))))
    sched, _ = step(scheduler, runner)
    assert [(r.req_id, r.block_ids, r.num_computed_tokens) for r in sched.new_reqs] == [
        ("a", [0, 1, 2], 0),
        ("b", [3, 4, 5], 0),
    ]
    assert (scheduler.stats().prefix_cache_queries, scheduler.stats().prefix_cache_hits) == (0, 0)


def test_rollback_of_an_unseen_step_resends_its_news_and_drops() -> None:
    """A step that failed on its way to the runner: its new requests go whole again, its drops
    again, except a dropped request that runs again (re-admitted since)."""
    s = make_scheduler()
    s.add_request(make_request("a", 20, max_tokens=4))
    first = s.schedule()
    assert [r.req_id for r in first.new_reqs] == ["a"]
    first.finished_req_ids |= {"gone", "a"}  # "a" as if dropped, then re-admitted
    s.rollback(first, unseen=True)
    again = s.schedule()
    assert [r.req_id for r in again.new_reqs] == ["a"] and not again.cached_reqs
    assert again.new_reqs[0].num_computed_tokens == 0 and again.num_scheduled_tokens == {"a": 20}
    assert again.finished_req_ids == {"gone"}  # not "a": it runs
    nxt = s.schedule()  # (as if `again` ran: the next step knows "a")
    assert not nxt.new_reqs and [r.req_id for r in nxt.cached_reqs] == ["a"]
