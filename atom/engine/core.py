"""EngineCore.step(): schedule -> execute -> update. Token ids in, token ids out; no text.

With an executor that can submit a step without waiting for it (the model runner), steps are
pipelined one deep and step() returns what it collected, so the caller's output processing
(detokenization, stop strings) runs while the GPU computes. With async scheduling (the default)
step() schedules and queues step N+1 *before* it waits for step N: the GPU finds the next step
queued when it finishes one, and scheduling, input building and the update of step N all run
while step N+1 computes. A decode of N+1 reads its input token from N's sampled ids on the device;
a request that N finishes (EOS, stop token) has one wasted row in N+1, whose output is dropped.
Blocks freed while a step is in flight are reused only by steps queued after it on the same
stream. Steps run one at a time (sync) while a running request uses penalties: they need every
output token on the host.
"""

from __future__ import annotations

import atexit
import functools
import gc
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from atom.config import EngineConfig
from atom.engine.outputs import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from atom.engine.request import Request, RequestStatus
from atom.engine.scheduler import Scheduler, SchedulerStats
from atom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Query lengths the warm-up runs alone: with 1 to 32 query heads per KV head they meet every
# attention tile a step of short queries picks (atom/kernels/attention_config.py).
WARMUP_QUERY_LENS = (2, 4, 8, 16, 32, 64)


class Executor(Protocol):
    def determine_num_kv_blocks(self) -> int: ...
    def kv_bytes_per_block(self) -> int: ...
    def allocate_kv_cache(self, num_blocks: int) -> None: ...
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput: ...
    def start_profile(self) -> None: ...
    def stop_profile(self) -> None: ...
    def shutdown(self) -> None: ...


class AsyncExecutor(Executor, Protocol):
    def submit_model(self, sched: SchedulerOutput) -> Callable[[], ModelRunnerOutput]:
        """Queue the step on the device; the returned function waits for its output. It may
        have a done() that says, without waiting, whether the output is ready."""
        ...


HostWork = Callable[[Callable[[], bool]], object]  # step()'s while_running: given busy()


def _not_busy() -> bool:
    return False


def step_done(wait: Callable[[], ModelRunnerOutput]) -> bool:
    """Whether a queued step's output is ready, asked without waiting (True where its wait
    cannot tell): for wrappers of a wait to pass its done() on."""
    done = getattr(wait, "done", None)
    return True if done is None else done()


def _busy_while(wait: Callable[[], ModelRunnerOutput]) -> Callable[[], bool]:
    """busy() of a queued step: True until its output is ready (False where none can tell)."""
    return _not_busy if getattr(wait, "done", None) is None else lambda: not step_done(wait)


def create_executor(config: EngineConfig) -> Executor:
    # The tensor side is imported on demand: the engine itself never needs torch.
    if config.parallel.tensor_parallel_size > 1:
        from atom.executor.worker import MultiprocExecutor

        return MultiprocExecutor(config)
    from atom.executor.model_runner import ModelRunner

    return ModelRunner(config)


def freeze_long_lived_objects() -> None:
    """Take what the engine keeps for its lifetime out of Python's cyclic garbage collector.

    A full collection walks every tracked object: with the KV cache's block objects (one per
    block, 10^5 and more) and the model, one took ~0.3 s mid-run (a stall the GPU waits through;
    bench_host_overhead.py at batch 256 on a 2-core CPU). Objects alive now are moved to the
    permanent generation (gc.freeze, as vLLM does after start-up); reference counting still frees
    them. Unfreezing first lets a collection reclaim an earlier engine of this process that was
    dropped since (tests build many); at exit everything is unfrozen again, so that the
    interpreter's last collection still finalises it (nanobind reports leaks otherwise)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _unfreeze_at_exit()


def reclaim_dropped_engines(device: str) -> None:
    """Free an earlier engine of this process that was dropped without shutdown() (a notebook's
    second LLM, a test after another) before this one measures GPU memory: the earlier one's
    objects were frozen at its start, so only a collection after unfreezing finds them, and until
    then its weights, KV cache and graphs count as this engine's peak and leave its KV cache
    nothing. The first engine of a process finds nothing frozen and pays nothing; on the CPU the
    KV budget is fixed, so the collection (~0.1 s with a test suite's heap, a CPU suite building
    hundreds of engines) waits for the end of the start-up as before."""
    if device == "cuda" and gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()


@functools.cache
def _unfreeze_at_exit() -> None:  # registered once per process
    atexit.register(gc.unfreeze)


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        start = time.perf_counter()
        phases: dict[str, float] = {}  # start-up phase -> seconds, for the ready line

        def lap(name: str) -> None:
            phases[name] = time.perf_counter() - start - sum(phases.values())

        self.config = config
        reclaim_dropped_engines(config.device)
        self.executor = executor if executor is not None else create_executor(config)
        lap("model")
        try:
            num_blocks = self.executor.determine_num_kv_blocks()
            lap("memory profile + compile")
            self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks)
            self.executor.allocate_kv_cache(num_blocks)
            lap("KV cache + graphs")
        except BaseException:
            self.executor.shutdown()  # no orphan worker processes
            raise
        self.num_kv_blocks = num_blocks
        self._in_flight: tuple[SchedulerOutput, Callable[[], ModelRunnerOutput]] | None = None
        if getattr(self.executor, "needs_warmup", False):
            self.warm_up()
            lap("warm-up")
        freeze_long_lived_objects()
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB); ready in %.1f s (%s)",
            num_blocks,
            config.cache.block_size,
            num_blocks * config.cache.block_size,
            num_blocks * self.executor.kv_bytes_per_block() / 2**30,
            time.perf_counter() - start,
            ", ".join(f"{name} {t:.1f} s" for name, t in phases.items()),
        )

    def warm_up(self) -> None:
        """Throwaway requests through prefill, a mixed step and decode, so that the first real
        request pays no kernel compilation (its TTFT was seconds on a cold start); then the
        prefix cache and its counters are reset.

        Then one short prompt alone per query length in WARMUP_QUERY_LENS: attention picks its
        tile from a step's longest query times the heads per KV head, so a step whose longest
        query is a short prompt, or the short rest of a prefix-cached or chunked one, met a tile
        size nothing had compiled (an H200 trace: 2.2 s in its first attention call)."""
        bs, max_len = self.config.cache.block_size, self.config.scheduler.max_model_len
        n = max(min(2 * bs + 3, max_len - 4), 1)
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)  # no RNG draws
        for i, length in enumerate((n, max(n // 2, 1))):  # the second joins the first's decode
            prompt = [1 + (7 * j + i) % 100 for j in range(length)]
            self.add_request(Request(f"__warmup_{i}", prompt, params))
            self.step()
        while self.has_work():
            self.step()
        short = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        for length in (q for q in WARMUP_QUERY_LENS if q < max_len):
            prompt = [1 + (5 * j + length) % 100 for j in range(length)]
            self.add_request(Request(f"__warmup_q{length}", prompt, short))
            while self.has_work():
                self.step()
        self.reset_prefix_cache()

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: Iterable[str]) -> None:
        """End requests that met a stop condition outside the core (a stop string)."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_STOPPED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def has_work(self) -> bool:
        """Requests to run, or a step in flight to collect."""
        return self._in_flight is not None or self.scheduler.has_unfinished_requests()

    def start_profile(self) -> None:
        self.executor.start_profile()

    def stop_profile(self) -> None:
        self.executor.stop_profile()

    def step(self, while_running: HostWork = lambda busy: None) -> list[EngineCoreOutput]:
        """One step's outputs. while_running(busy) is host work to hide behind the device: it
        runs once the next step is queued, before the wait for the one before it, and busy()
        says whether the device still runs that one (LLM.generate builds its finished requests'
        outputs there, piece by piece while busy() holds); with an executor that cannot queue a
        step, before the step runs, busy() always False."""
        submit = getattr(self.executor, "submit_model", None)
        if submit is None:
            sched = self.scheduler.schedule()
            while_running(_not_busy)
            return self._update(sched, lambda: self.executor.execute_model(sched))
        if self._in_flight is not None and self._schedule_ahead():
            previous, self._in_flight = self._in_flight, None
            try:
                self._submit(submit)
            except BaseException:
                self._in_flight = previous  # step N still runs: the next step() collects it
                raise
            try:
                while_running(_busy_while(previous[1]))
            finally:  # step N is collected even when while_running raised
                outputs = self._update(*previous)
            return outputs
        outputs = self._collect()
        self._submit(submit)
        while_running(_not_busy if self._in_flight is None else _busy_while(self._in_flight[1]))
        return outputs

    def _schedule_ahead(self) -> bool:
        return self.config.scheduler.async_scheduling and not any(
            r.needs_output_history for r in self.scheduler.running
        )

    def _submit(self, submit: Callable[[SchedulerOutput], Callable[[], ModelRunnerOutput]]) -> None:
        if not self.scheduler.has_unfinished_requests():
            return
        sched = self.scheduler.schedule()
        try:
            wait = submit(sched)
        except BaseException:
            self.scheduler.rollback(sched, unseen=True)
            raise
        if sched.is_empty:  # nothing to compute: only the finished ids had to reach the runner
            wait()
        else:
            self._in_flight = (sched, wait)

    def _collect(self) -> list[EngineCoreOutput]:
        if self._in_flight is None:
            return []
        sched, wait = self._in_flight
        self._in_flight = None
        return self._update(sched, wait)

    def _update(
        self, sched: SchedulerOutput, run: Callable[[], ModelRunnerOutput]
    ) -> list[EngineCoreOutput]:
        try:
            result = run()
        except BaseException:
            self.scheduler.rollback(sched)
            raise
        return self.scheduler.update_from_output(sched, result)

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def shutdown(self) -> None:
        self._in_flight = None
        self.executor.shutdown()

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv.reset_prefix_cache()
