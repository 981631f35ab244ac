"""Token-budget scheduler: one budget per step, no phases (DESIGN.md §1).

Every request has `num_computed_tokens` catching up with `num_tokens`. A step first gives each
running request its next tokens (1 for decode, a chunk for prefill), oldest first, then admits
waiting requests FCFS while the token budget, `max_num_seqs` and the KV pool allow. When the pool
runs dry the newest running request is preempted: its blocks are freed and it is recomputed later,
ahead of the queue.

A step that reaches the end of a request's tokens samples one more: it counts in `num_pending`
until update_from_output appends it. A step may be scheduled while the previous one still runs
(async scheduling): a decode then takes the pending token as its input (the runner reads it on
the device), a request whose pending tokens reach max_tokens or max_model_len waits, and a
preempted request waits for its pending tokens before it is readmitted.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from atom.config import CacheConfig, SchedulerConfig
from atom.engine.kv_cache_manager import KVCacheManager
from atom.engine.outputs import (
    CachedRequestData,
    EngineCoreOutput,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from atom.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_preemptions: int
    num_prompt_tokens: int = 0  # prefill tokens scheduled since start (a recompute after
    # preemption included)
    num_generation_tokens: int = 0  # tokens sampled since start


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, cache_config: CacheConfig, num_kv_blocks: int
    ) -> None:
        self.config = config
        self.block_size = cache_config.block_size
        if num_kv_blocks * self.block_size < config.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_kv_blocks * self.block_size} tokens, fewer than "
                f"max_model_len={config.max_model_len}: lower max_model_len or give the cache "
                "more memory"
            )
        self.kv = KVCacheManager(num_kv_blocks, self.block_size, cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._dropped_ids: set[str] = set()  # finished or preempted since the last schedule()
        # Running, but the step that introduced them failed before the runner surely saw them:
        # their next step sends them whole again.
        self._unsent: set[str] = set()
        self.num_preemptions = 0
        self.num_prompt_tokens = 0  # stats: prefill tokens scheduled, tokens sampled
        self.num_generation_tokens = 0

    # ---- requests in and out ----
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if not req.prompt_token_ids:
            raise ValueError("the prompt is empty")
        if req.num_prompt_tokens > self.config.max_model_len:
            raise ValueError(
                f"the prompt has {req.num_prompt_tokens} tokens, more than "
                f"max_model_len={self.config.max_model_len}"
            )
        req.set_max_model_len(self.config.max_model_len)
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish_requests(
        self, request_ids: Iterable[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED
    ) -> None:
        """End requests from outside (abort, or a stop string seen by the detokenizer)."""
        for request_id in request_ids:
            req = self.requests.get(request_id)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self._free(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._dropped_ids)
        self._dropped_ids = set()
        budget = self.config.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending and req.num_tokens + req.num_pending >= req.max_num_tokens:
                i += 1  # its last token is being sampled
                continue
            num_new = req.num_tokens + req.num_pending - req.num_computed_tokens
            if num_new > 1:  # a prefill chunk (a decode is 1 token: within any budget)
                num_new = self._chunk(num_new, budget)
            new_block_ids = self.kv.allocate_slots(req, num_new)
            while new_block_ids is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
                new_block_ids = self.kv.allocate_slots(req, num_new)
            if new_block_ids is None:
                break
            if req.request_id in self._unsent:
                self._unsent.discard(req.request_id)
                out.new_reqs.append(self._new_request_data(req))
            else:
                out.cached_reqs.append(
                    CachedRequestData(req.request_id, new_block_ids, req.num_computed_tokens)
                )
            out.num_scheduled_tokens[req.request_id] = num_new
            budget -= num_new
            if num_new > 1 or req.num_computed_tokens < len(req.prompt_token_ids):
                self.num_prompt_tokens += num_new  # a prefill chunk (a decode is 1 token)
            self._advance(req, num_new)
            i += 1
        # A step that had to preempt admits nobody: the pool is full.
        if not preempted:
            budget = self._admit_waiting(out, budget)
        out.finished_req_ids |= self._dropped_ids
        self._dropped_ids = set()
        out.total_num_scheduled_tokens = self.config.max_num_batched_tokens - budget
        return out

    @staticmethod
    def _advance(req: Request, num_new: int) -> None:
        """Count a scheduled chunk as computed (preemption only ever takes requests not yet
        scheduled in the step, so none is undone)."""
        req.num_computed_tokens += num_new
        if req.num_computed_tokens >= req.num_tokens + req.num_pending:
            req.num_pending += 1  # this step samples its next token

    def rollback(self, sched: SchedulerOutput, unseen: bool = False) -> None:
        """Undo a step whose execution failed: its tokens were not computed, so the blocks it
        registered in the prefix cache hold no KV. unseen: it failed on its way to the runner,
        which may not have read it: the drops it carried go with the next step (dropping twice
        is harmless; a request running again is not dropped), and its new requests are sent
        whole again (a runner that did see one replaces its state)."""
        if unseen:
            running = {r.request_id for r in self.running}
            self._dropped_ids |= sched.finished_req_ids - running
            self._unsent |= {r.req_id for r in sched.new_reqs} & running
        for req_id, n in sched.num_scheduled_tokens.items():
            req = self.requests.get(req_id)
            if req is not None:
                if req.num_computed_tokens >= req.num_tokens + req.num_pending - 1:
                    req.num_pending = max(req.num_pending - 1, 0)  # it was to sample
                req.num_computed_tokens -= n
                self.kv.uncache_from(req, req.num_computed_tokens)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        now = time.time()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending:
                break  # preempted while a step sampled for it: recompute with that token
            hits = self.kv.get_computed_blocks(req)
            num_computed = len(hits) * self.block_size
            num_new = req.num_tokens - num_computed
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = self._chunk(num_new, budget)
            if self.kv.allocate_slots(req, num_new, hits) is None:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            req.num_computed_tokens = num_computed
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_computed
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            self.running.append(req)
            out.new_reqs.append(self._new_request_data(req))
            out.num_scheduled_tokens[req.request_id] = num_new
            budget -= num_new
            self.num_prompt_tokens += num_new
            self._advance(req, num_new)
        return budget

    def _new_request_data(self, req: Request) -> NewRequestData:
        """All the runner needs of a request it has not seen (before the step advances it)."""
        return NewRequestData(
            req_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=list(req.output_token_ids),
            sampling_params=req.sampling_params,
            block_ids=self.kv.block_ids(req.request_id),
            num_computed_tokens=req.num_computed_tokens,
        )

    def _chunk(self, num_tokens: int, budget: int) -> int:
        n = min(num_tokens, budget)
        if self.config.long_prefill_token_threshold > 0:
            n = min(n, self.config.long_prefill_token_threshold)
        return n

    def _preempt(self, req: Request) -> None:
        logger.debug("preempting %s (%d tokens)", req.request_id, req.num_tokens)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        self._dropped_ids.add(req.request_id)
        self._unsent.discard(req.request_id)  # re-admitted whole anyway

    # ---- results ----
    def update_from_output(
        self, sched: SchedulerOutput, result: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        # Runs for every request every step: local names, one status read per request.
        outputs: list[EngineCoreOutput] = []
        requests, prompt_logprobs_of = self.requests, result.prompt_logprobs
        running_finished = False
        num_generated = 0
        for idx, req_id in enumerate(result.req_ids):
            req = requests.get(req_id)
            if req is None:
                continue
            status = req.status
            preempted = status is RequestStatus.PREEMPTED
            if status is not RequestStatus.RUNNING and not preempted:
                continue  # finished from outside while the step ran
            # Preempted while the step ran (async scheduling): its token still counts, its prompt
            # logprobs come again with the recompute.
            new_tokens: list[int] = []
            for token_id in result.sampled_token_ids[idx]:
                req.num_pending -= 1
                req.append_output(token_id)
                new_tokens.append(token_id)
                if self._check_stop(req, token_id):
                    break
            prompt_logprobs = (
                self._new_prompt_logprobs(req, sched, result)
                if prompt_logprobs_of and not preempted
                else []
            )
            finish_reason = req.status.finish_reason
            if finish_reason is not None:
                if preempted:  # its last token came after the preemption
                    self.waiting.remove(req)
                    self._free(req)
                else:
                    running_finished = True
            num_generated += len(new_tokens)
            if not new_tokens and not prompt_logprobs:
                continue
            logprobs = result.logprobs[idx]
            outputs.append(
                EngineCoreOutput(
                    request_id=req_id,
                    new_token_ids=new_tokens,
                    new_logprobs=[logprobs] if logprobs is not None and new_tokens else [],
                    new_prompt_logprobs=prompt_logprobs,
                    finish_reason=finish_reason,
                    stop_reason=req.stop_reason,
                    num_cached_tokens=max(req.num_cached_tokens, 0),
                    scheduled_time=req.first_scheduled_time,
                )
            )
        if running_finished:
            for req in [r for r in self.running if r.status.finished]:
                self._free(req)
            self.running = [r for r in self.running if not r.status.finished]
        self.num_generation_tokens += num_generated
        return outputs

    def _new_prompt_logprobs(
        self, req: Request, sched: SchedulerOutput, result: ModelRunnerOutput
    ) -> list:
        """Prompt logprobs of this step, minus those delivered before a preemption.

        Entry j (j >= 1) scores prompt token j; a chunk over positions [s, e) yields entries from
        s + 1 on.
        """
        entries = result.prompt_logprobs.get(req.request_id)
        if not entries:
            return []
        # The step's start as scheduled: a step scheduled after it (async) has moved the request.
        start = next(
            r.num_computed_tokens
            for r in (*sched.new_reqs, *sched.cached_reqs)
            if r.req_id == req.request_id
        )
        first = start + 1
        entries = entries[max(0, req.num_prompt_logprobs + 1 - first) :]
        req.num_prompt_logprobs += len(entries)
        return entries

    def _check_stop(self, req: Request, token_id: int) -> bool:
        params = req.sampling_params
        if token_id in req.stop_token_set and req.num_output_tokens >= params.min_tokens:
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token_id if token_id in params.stop_token_ids else None
        elif req.num_tokens >= req.max_num_tokens:  # max_tokens or max_model_len
            req.status = RequestStatus.FINISHED_LENGTH
        return req.status.finished

    def _free(self, req: Request) -> None:
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
        self._dropped_ids.add(req.request_id)
        self._unsent.discard(req.request_id)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            num_free_blocks=self.kv.pool.num_free_blocks,
            prefix_cache_queries=self.kv.prefix_query_tokens,
            prefix_cache_hits=self.kv.prefix_hit_tokens,
            num_preemptions=self.num_preemptions,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
        )
