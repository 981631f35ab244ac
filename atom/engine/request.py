"""One generation request as the engine core sees it: token ids and progress, no text."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from atom.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Each member carries finish_reason ("stop", "length", "abort"; None while unfinished) and
    finished as plain attributes: the scheduler reads them for every request every step, and an
    Enum member's hash (for a set or dict lookup) is a Python-level call."""

    WAITING = (1, None)
    RUNNING = (2, None)
    PREEMPTED = (3, None)
    FINISHED_STOPPED = (4, "stop")  # EOS or a stop token / stop string
    FINISHED_LENGTH = (5, "length")  # max_tokens or max_model_len
    FINISHED_ABORTED = (6, "abort")

    def __init__(self, number: int, finish_reason: str | None) -> None:
        self.finish_reason = finish_reason
        self.finished = finish_reason is not None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.time)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (or is being computed)
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling; -1 = not scheduled yet
    num_preemptions: int = 0
    num_prompt_logprobs: int = 0  # prompt logprob entries delivered (they survive preemption)
    # Tokens being sampled by scheduled steps whose output has not come back yet: with async
    # scheduling a decode step is scheduled before the previous one's token is known.
    num_pending: int = 0
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of its full blocks
    first_scheduled_time: float | None = None
    stop_token_set: frozenset[int] = field(init=False)  # the params' stop ids, computed once
    needs_output_history: bool = field(init=False)  # penalties: every output token on the host
    # Prompt + output tokens: an attribute (append_output keeps it), as the scheduler reads it
    # several times per request per step.
    num_tokens: int = field(init=False)
    # Where it ends by length: prompt + max_tokens, capped by the scheduler's max_model_len.
    max_num_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.stop_token_set = frozenset(self.sampling_params.all_stop_token_ids)
        self.needs_output_history = self.sampling_params.needs_output_history
        self.num_tokens = len(self.prompt_token_ids) + len(self.output_token_ids)
        self.set_max_model_len(None)

    def set_max_model_len(self, max_model_len: int | None) -> None:
        max_tokens = self.sampling_params.max_tokens
        limits = [] if max_model_len is None else [max_model_len]
        if max_tokens is not None:
            limits.append(len(self.prompt_token_ids) + max_tokens)
        self.max_num_tokens = min(limits, default=2**62)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.num_tokens += 1

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without concatenating the whole list."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]
