"""Random add/step/abort against a small pool: no block ever leaks, and preemption (forced by the
small pool) changes no token."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from atom.engine.kv_cache_manager import cdiv
from atom.engine.outputs import EngineCoreOutput
from atom.engine.request import Request, RequestStatus
from atom.engine.scheduler import Scheduler

from .fake_runner import FakeRunner, make_request, make_scheduler

NUM_BLOCKS = 10  # 160 tokens: two long requests already preempt each other
MAX_MODEL_LEN = 128
VOCAB = 24
EOS = 0
NUM_STEPS = 300


def token_at(tokens: list[int]) -> int:
    """The fake model: the next token depends on the sequence only."""
    return (tokens[-1] * 7 + len(tokens) * 3 + tokens[0]) % VOCAB


def random_request(rng: random.Random, request_id: str, bases: list[list[int]]) -> Request:
    # Prompts share prefixes of a few bases, so prefix hits (and shared blocks) are common.
    base = rng.choice(bases)
    shared = rng.randint(0, len(base))
    prompt = base[:shared] + [rng.randrange(1, VOCAB) for _ in range(rng.randint(0, 40))]
    prompt = prompt[: rng.randint(1, 120)] or [1]
    max_tokens = rng.choice([None, 1, 2, rng.randint(1, 60)])
    params: dict[str, object] = {"max_tokens": max_tokens}
    if rng.random() < 0.2:
        params["ignore_eos"] = True
    if rng.random() < 0.2:
        params["stop_token_ids"] = [rng.randrange(VOCAB)]
    if rng.random() < 0.2:
        params["min_tokens"] = rng.randint(0, max_tokens or 10)
    if rng.random() < 0.1:
        params["prompt_logprobs"] = 0
    return make_request(request_id, prompt, eos=[EOS], **params)


def check_invariants(scheduler: Scheduler) -> None:
    kv, pool, bs = scheduler.kv, scheduler.kv.pool, scheduler.block_size
    running_ids = [r.request_id for r in scheduler.running]
    waiting_ids = [r.request_id for r in scheduler.waiting]
    assert len(running_ids) <= scheduler.config.max_num_seqs
    assert set(scheduler.requests) == set(running_ids) | set(waiting_ids)
    assert len(scheduler.requests) == len(running_ids) + len(waiting_ids)
    assert set(kv.req_blocks) == set(running_ids)  # waiting requests hold no block

    holders = Counter(b.block_id for blocks in kv.req_blocks.values() for b in blocks)
    assert sum(len(blocks) for blocks in kv.req_blocks.values()) == sum(
        b.ref_cnt for b in pool.blocks
    )
    assert all(b.ref_cnt == holders[b.block_id] for b in pool.blocks)
    assert pool.num_free_blocks == sum(1 for b in pool.blocks if b.ref_cnt == 0)

    for req in scheduler.running:
        assert req.status == RequestStatus.RUNNING
        blocks = kv.block_ids(req.request_id)
        assert len(set(blocks)) == len(blocks)
        assert len(blocks) == cdiv(req.num_computed_tokens, bs)
        # Reaching the end of the known tokens always samples one more.
        assert req.num_computed_tokens < req.num_tokens
    for req in scheduler.waiting:
        assert req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert req.num_computed_tokens == 0


def collect(
    outputs: list[EngineCoreOutput],
    generated: dict[str, list[int]],
    finished: dict[str, EngineCoreOutput],
) -> None:
    for o in outputs:
        assert o.request_id not in finished, "output after the finish"
        generated.setdefault(o.request_id, []).extend(o.new_token_ids)
        if o.finished:
            finished[o.request_id] = o


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_random_add_step_abort_never_leaks(seed: int, enable_prefix_caching: bool) -> None:
    rng = random.Random(seed)
    scheduler = make_scheduler(
        NUM_BLOCKS,
        enable_prefix_caching=enable_prefix_caching,
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=(16, 48, 200)[seed % 3],
        max_num_seqs=(3, 8)[seed % 2],
        long_prefill_token_threshold=(0, 24)[seed // 3],
    )
    runner = FakeRunner(scheduler, token_fn=lambda req: token_at(req.all_token_ids))
    bases = [[rng.randrange(1, VOCAB) for _ in range(100)] for _ in range(3)]
    requests: dict[str, Request] = {}
    generated: dict[str, list[int]] = {}
    finished: dict[str, EngineCoreOutput] = {}
    aborted: set[str] = set()

    def abort_one() -> None:
        live = sorted(scheduler.requests)
        if live:
            req_id = rng.choice(live)
            scheduler.finish_requests([req_id])
            aborted.add(req_id)

    for i in range(NUM_STEPS + 1000):
        adding = i < NUM_STEPS
        if not adding and not scheduler.has_unfinished_requests():
            break
        if adding and rng.random() < 0.4:
            req = random_request(rng, f"r{i}", bases)
            requests[req.request_id] = req
            scheduler.add_request(req)
        if adding and rng.random() < 0.05:
            abort_one()
        sched = scheduler.schedule()
        assert sched.total_num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
        result = runner.execute(sched)
        if adding and rng.random() < 0.05:
            abort_one()  # while the step "runs"
        collect(scheduler.update_from_output(sched, result), generated, finished)
        check_invariants(scheduler)
    else:
        raise AssertionError("requests still unfinished")

    # Nothing left: every block is free and unreferenced.
    pool = scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks == NUM_BLOCKS
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert scheduler.kv.req_blocks == {}
    assert scheduler.requests == {}
    assert scheduler.kv.reset_prefix_cache() is True
    assert scheduler.num_preemptions > 0

    assert set(finished) | aborted == set(requests)
    for req_id, req in requests.items():
        out = generated.get(req_id, [])
        assert out == req.output_token_ids
        # Same tokens as an uninterrupted run: preemption and prefix hits change nothing.
        assert out == [token_at(req.prompt_token_ids + out[:j]) for j in range(len(out))]
        if req_id in aborted:
            continue
        sp = req.sampling_params
        assert req.num_tokens <= MAX_MODEL_LEN
        assert sp.max_tokens is None or len(out) <= sp.max_tokens
        if finished[req_id].finish_reason == "stop":
            assert out[-1] in sp.all_stop_token_ids
            assert len(out) >= sp.min_tokens
        else:
            assert len(out) == sp.max_tokens or req.num_tokens == MAX_MODEL_LEN
