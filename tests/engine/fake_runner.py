"""A model runner stand-in for scheduler tests: it keeps the runner-side view of each request
(block table, computed tokens) from the SchedulerOutputs alone, checks it against the scheduler,
and samples deterministic tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from atom.config import CacheConfig, SchedulerConfig
from atom.engine.outputs import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from atom.engine.request import Request
from atom.engine.scheduler import Scheduler
from atom.sampling_params import SamplingParams

TokenFn = Callable[[Request], int]


def default_token(req: Request) -> int:
    """Deterministic in the request's position only, so preemption changes no token."""
    return 1000 + req.num_output_tokens


def make_scheduler(
    num_blocks: int = 64,
    *,
    block_size: int = 16,
    enable_prefix_caching: bool = True,
    **config: int | bool,
) -> Scheduler:
    config.setdefault("max_model_len", 256)
    return Scheduler(
        SchedulerConfig(**config),  # type: ignore[arg-type]
        CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching),
        num_blocks,
    )


def make_request(
    request_id: str, prompt: Sequence[int] | int, eos: Sequence[int] = (), **params: object
) -> Request:
    """`prompt` is the token ids, or a length (tokens derived from the id, unique per request)."""
    if isinstance(prompt, int):
        base = 10_000 * (sum(map(ord, request_id)) % 97 + 1)
        prompt = [base + i for i in range(prompt)]
    sp = SamplingParams(**params, _eos_token_ids=tuple(eos))  # type: ignore[arg-type]
    return Request(request_id, list(prompt), sp)


@dataclass
class RunnerRequest:
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class FakeRunner:
    scheduler: Scheduler
    token_fn: TokenFn = default_token
    script: dict[str, list[int]] = field(default_factory=dict)  # per-request sampled tokens
    state: dict[str, RunnerRequest] = field(default_factory=dict)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self._apply(sched)
        out = ModelRunnerOutput()
        for req_id, n in sched.num_scheduled_tokens.items():
            req = self.scheduler.requests[req_id]
            state = self.state[req_id]
            state.num_computed_tokens += n
            assert state.num_computed_tokens == req.num_computed_tokens
            assert len(state.block_ids) * self.scheduler.block_size >= req.num_computed_tokens
            out.req_ids.append(req_id)
            out.logprobs.append(None)
            # Only a step that reaches the end of the known tokens yields a token.
            done = req.num_computed_tokens == req.num_tokens
            out.sampled_token_ids.append([self._sample(req)] if done else [])
        return out

    def _sample(self, req: Request) -> int:
        script = self.script.get(req.request_id, [])
        if req.num_output_tokens < len(script):
            return script[req.num_output_tokens]
        return self.token_fn(req)

    def _apply(self, sched: SchedulerOutput) -> None:
        """Update the runner-side view exactly as a model runner would, then compare."""
        for req_id in sched.finished_req_ids:
            self.state.pop(req_id, None)
        for new in sched.new_reqs:
            assert new.req_id not in self.state
            self.state[new.req_id] = RunnerRequest(list(new.block_ids), new.num_computed_tokens)
        for cached in sched.cached_reqs:
            assert cached.req_id not in sched.finished_req_ids
            state = self.state[cached.req_id]
            assert state.num_computed_tokens == cached.num_computed_tokens
            state.block_ids.extend(cached.new_block_ids)
        scheduled = {r.req_id for r in sched.new_reqs} | {r.req_id for r in sched.cached_reqs}
        assert scheduled == set(sched.num_scheduled_tokens)
        assert sched.total_num_scheduled_tokens == sum(sched.num_scheduled_tokens.values())
        for req_id in scheduled:
            assert self.state[req_id].block_ids == self.scheduler.kv.block_ids(req_id)


def step(
    scheduler: Scheduler, runner: FakeRunner
) -> tuple[SchedulerOutput, dict[str, EngineCoreOutput]]:
    sched = scheduler.schedule()
    outputs = scheduler.update_from_output(sched, runner.execute(sched))
    return sched, {o.request_id: o for o in outputs}


def run_to_completion(
    scheduler: Scheduler, runner: FakeRunner, max_steps: int = 1000
) -> dict[str, list[EngineCoreOutput]]:
    """Step until nothing is left; every request's outputs, in order."""
    outputs: dict[str, list[EngineCoreOutput]] = {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return outputs
        _, step_outputs = step(scheduler, runner)
        for req_id, output in step_outputs.items():
            outputs.setdefault(req_id, []).append(output)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def generated(outputs: list[EngineCoreOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]
