"""Front-end side of outputs: token ids from the core become text, logprobs and RequestOutputs.

A request with n > 1 runs in the core as n child requests; their completions are gathered back
under the parent's id here. Stop strings are found on the text, so this is also where they end a
request: the ids returned by `process` must be finished in the core.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from atom.engine.detokenizer import IncrementalDetokenizer
from atom.engine.outputs import EngineCoreOutput, TokenLogprobs
from atom.outputs import (
    CompletionOutput,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from atom.sampling_params import SamplingParams


@dataclass(eq=False)
class _Completion:
    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(eq=False)
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[_Completion]
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


def child_request_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{index}_{parent_id}"


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}
        self._child_to_parent: dict[str, tuple[str, int]] = {}
        self._finished: deque[_RequestState] = deque()  # process(defer=True)'s, for take_finished

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        streamed: bool = True,
    ) -> None:
        """Register a request whose n completions run as core requests child_request_id(...).
        streamed=False: only its final output is read (text decoded once, at the end, unless a
        stop string needs it token by token)."""
        completions = []
        for i in range(params.n):
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, params, deferred=not streamed
                )
            completions.append(
                _Completion(
                    i,
                    detok,
                    logprobs=[] if params.logprobs is not None else None,
                    cumulative_logprob=0.0 if params.logprobs is not None else None,
                )
            )
            self._child_to_parent[child_request_id(request_id, i, params.n)] = (request_id, i)
        self._requests[request_id] = _RequestState(
            request_id,
            prompt,
            prompt_token_ids,
            params,
            completions,
            RequestMetrics(arrival_time=arrival_time),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )

    def aborted_output(self, request_id: str) -> RequestOutput | None:
        """The request's last RequestOutput, its unfinished completions ended as "abort"."""
        state = self._requests.get(request_id)
        if state is None:
            return None
        for c in state.completions:
            if c.finish_reason is None:
                c.finish_reason = "abort"
        state.metrics.finished_time = time.time()
        return self._make_output(state)

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns its core request ids."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return []
        ids = [child_request_id(request_id, i, state.params.n) for i in range(state.params.n)]
        for child in ids:
            self._child_to_parent.pop(child, None)
        return ids

    def process(
        self, outputs: list[EngineCoreOutput], final_only: bool = False, defer: bool = False
    ) -> tuple[list[RequestOutput], list[str]]:
        """Returns the updated RequestOutputs (with final_only, those of finished requests
        alone: a snapshot copies every token so far) and the core ids ended by a stop string.
        defer (with final_only): finished requests are kept for take_finished instead, which
        builds their outputs (and decodes their text) when the caller has time to spare."""
        assert final_only or not defer, "only final outputs can be deferred"
        now = time.time()
        touched: dict[str, _RequestState] = {}  # with final_only: those a completion of ended
        to_finish: list[str] = []
        for out in outputs:
            parent = self._child_to_parent.get(out.request_id)
            if parent is None:
                continue
            state = self._requests[parent[0]]
            comp = state.completions[parent[1]]
            if self._apply(state, comp, out, now):
                to_finish.append(out.request_id)
            if comp.finish_reason is not None:
                del self._child_to_parent[out.request_id]
            elif final_only:
                continue  # this request cannot have finished in this call
            touched[state.request_id] = state
        results = []
        for state in touched.values():
            if state.finished:
                state.metrics.finished_time = now
                del self._requests[state.request_id]
                if defer:
                    self._finished.append(state)
                    continue
            elif final_only:
                continue
            results.append(self._make_output(state))
        return results, to_finish

    def take_finished(self, max_ids: int | None = None) -> list[RequestOutput]:
        """The outputs of the finished requests process(defer=True) kept, the first finished
        first, built now. max_ids (None: no bound) bounds the deferred token ids whose text this
        call decodes: a request whose text is not all decoded yet waits for a later call, which
        goes on where this one stopped."""
        built: list[RequestOutput] = []
        left = max_ids
        while self._finished and (left is None or left > 0):
            state = self._finished[0]
            detoks = [c.detokenizer for c in state.completions if c.detokenizer is not None]
            for detok in detoks:
                if detok.num_deferred and (left is None or left > 0):
                    taken = detok.decode_deferred(left)
                    left = None if left is None else left - taken
            if any(detok.num_deferred for detok in detoks):
                break
            self._finished.popleft()
            built.append(self._make_output(state))
        return built

    @property
    def num_finished(self) -> int:
        """Finished requests process(defer=True) kept, not yet taken."""
        return len(self._finished)

    def drop_finished(self) -> None:
        """Forget the finished requests process(defer=True) kept (their generate failed)."""
        self._finished.clear()

    def _apply(
        self, state: _RequestState, comp: _Completion, out: EngineCoreOutput, now: float
    ) -> bool:
        if out.new_prompt_logprobs and state.prompt_logprobs is not None:
            state.prompt_logprobs += [self._position(p) for p in out.new_prompt_logprobs]
        state.num_cached_tokens = out.num_cached_tokens
        if state.metrics.first_scheduled_time is None:
            state.metrics.first_scheduled_time = out.scheduled_time
        if out.new_token_ids:
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            state.metrics.last_token_time = now
        comp.token_ids += out.new_token_ids
        if comp.logprobs is not None:
            for position in out.new_logprobs:
                comp.logprobs.append(self._position(position))
                assert comp.cumulative_logprob is not None
                comp.cumulative_logprob += position.logprobs[0]
        comp.finish_reason, comp.stop_reason = out.finish_reason, out.stop_reason
        if comp.detokenizer is None:
            return False
        stopped_on_token = out.finish_reason == "stop" and not isinstance(out.stop_reason, str)
        stop = comp.detokenizer.update(out.new_token_ids, len(comp.token_ids), stopped_on_token)
        if stop is None:
            return False
        comp.finish_reason, comp.stop_reason = "stop", stop
        return out.finish_reason is None  # still running in the core: end it there

    def _position(self, entry: TokenLogprobs) -> PositionLogprobs:
        position: PositionLogprobs = {}
        for j, (token_id, logprob) in enumerate(zip(entry.token_ids, entry.logprobs, strict=True)):
            if token_id in position:
                continue
            rank = entry.rank if j == 0 else j
            decoded = self.tokenizer.decode([token_id]) if self.tokenizer is not None else None
            position[token_id] = Logprob(logprob, rank, decoded)
        return position

    def _make_output(self, state: _RequestState) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=c.index,
                text=c.detokenizer.output_text if c.detokenizer is not None else "",
                token_ids=list(c.token_ids),
                cumulative_logprob=c.cumulative_logprob,
                logprobs=c.logprobs,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                delta_text=c.detokenizer.new_text(c.finish_reason is not None)
                if c.detokenizer is not None
                else "",
            )
            for c in state.completions
        ]
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=state.prompt_logprobs,
            outputs=outputs,
            finished=state.finished,
            metrics=state.metrics,
            num_cached_tokens=state.num_cached_tokens,
        )
