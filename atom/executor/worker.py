"""Tensor parallelism: one process per rank, rank 0 inside the engine-core process.

Rank 0 sends each command (a typed message, tp_channel.py) to the worker ranks;
every rank then runs the same ModelRunner call on its shard, so the collectives inside the model
(all-reduce after row-parallel layers, all-gather of logits, broadcast of sampled ids) line up.

Steps are queued as on one device (async scheduling): rank 0 sends step N+1 and queues it before
it waits for step N. A step's wait records its sampled ids into the runner's request states, and
the next step's inputs are built from those states, so a worker interleaves waits and submits as
rank 0 did: each ExecuteModel says how many of its steps rank 0 had waited for before queuing it,
and the worker first waits for as many of its own. (Before Profile and AllocateKVCache a worker
waits for every step it has; a step built after such a wait reads its input token from the host
instead of the device, the same token and the same seeds.)

    rank 0   submit 1 | submit 2 | wait 1 | submit 3 (waited=1) | wait 2 | ...
    worker   recv 1: submit 1 | recv 2: submit 2 | recv 3: wait 1, submit 3 | ...
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from atom.config import EngineConfig
from atom.distributed import free_port, init_tensor_parallel, leave_tensor_parallel
from atom.engine.core import step_done
from atom.engine.outputs import ModelRunnerOutput, SchedulerOutput
from atom.executor.model_runner import ModelRunner
from atom.executor.tp_channel import Channel

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AllocateKVCache:
    num_blocks: int


@dataclass(frozen=True, slots=True)
class ExecuteModel:
    sched: SchedulerOutput
    waited: int  # rank 0's (non-empty) steps waited for before this one was queued


@dataclass(frozen=True, slots=True)
class Profile:
    start: bool  # start or stop the torch profiler


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


Command = AllocateKVCache | ExecuteModel | Profile | Shutdown


# At shutdown every rank leaves together: rank 0 sends Shutdown, all meet at a barrier (every
# worker has its command and has waited for its steps), then each leaves the group (NCCL's
# aborted once its device is idle: leave_tensor_parallel) and the workers exit.
SHUTDOWN_TIMEOUT = timedelta(seconds=60)


class _QueuedSteps:
    """A worker's steps on the device, waited for as rank 0 waited for its own (module doc)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.waits: deque[Callable[[], ModelRunnerOutput]] = deque()
        self.waited = 0

    def wait_until(self, waited: int) -> None:
        """Waits for steps until `waited` have been. A wait that fails is logged and counted,
        as rank 0 counts its own: the step after it is still queued."""
        while self.waits and self.waited < waited:
            self.waited += 1
            try:
                self.waits.popleft()()
            except Exception:
                logger.exception("rank %d: waiting for a step failed", self.rank)

    def wait_all(self) -> None:
        self.wait_until(self.waited + len(self.waits))


def _worker_main(config: EngineConfig, rank: int, port: int) -> None:
    _join(config, rank, port)
    channel = Channel(SHUTDOWN_TIMEOUT)
    runner = ModelRunner(config, rank)
    runner.determine_num_kv_blocks()  # a collective: every rank takes part
    steps = _QueuedSteps(rank)
    while not isinstance(command := channel.recv(), Shutdown):
        try:
            if isinstance(command, ExecuteModel):
                steps.wait_until(command.waited)
                wait = runner.submit_model(command.sched)
                if command.sched.is_empty:  # nothing queued, only finished requests dropped
                    wait()
                else:
                    steps.waits.append(wait)
                continue
            steps.wait_all()  # Profile and AllocateKVCache find no step in flight
            if isinstance(command, AllocateKVCache):
                runner.allocate_kv_cache(command.num_blocks)
            else:
                runner.start_profile() if command.start else runner.stop_profile()
        except Exception:
            # Input-dependent failures hit every rank alike; rank 0 reports them, we go on.
            logger.exception("rank %d: %s failed", rank, type(command).__name__)
    steps.wait_all()
    runner.shutdown()
    abort = False
    try:
        channel.barrier()
    except Exception:  # rank 0 is gone: nobody to leave the group with
        logger.exception("rank %d: shutdown without rank 0", rank)
        abort = True
    channel.close()
    leave_tensor_parallel(abort)


def _join(config: EngineConfig, rank: int, port: int) -> None:
    p = config.parallel
    init_tensor_parallel(rank, p.world_size, port, config.device, not p.disable_custom_all_reduce)


class _CountedWait:
    """Rank 0's wait for a queued step, counted for the workers (ExecuteModel.waited); done()
    asks the step without waiting, as EngineCore.step's busy() does."""

    __slots__ = ("_executor", "_wait")

    def __init__(self, wait: Callable[[], ModelRunnerOutput], executor: MultiprocExecutor):
        self._wait, self._executor = wait, executor

    def __call__(self) -> ModelRunnerOutput:
        self._executor.waited += 1
        return self._wait()

    def done(self) -> bool:
        return step_done(self._wait)


class MultiprocExecutor:
    def __init__(self, config: EngineConfig) -> None:
        world = config.parallel.world_size
        port = free_port()
        ctx = mp.get_context("spawn")
        self.workers = [
            ctx.Process(
                target=_worker_main, args=(config, r, port), daemon=True, name=f"atom-tp{r}"
            )
            for r in range(1, world)
        ]
        for p in self.workers:
            p.start()
        self._closed = False
        self.waited = 0  # rank 0's steps waited for (ExecuteModel.waited)
        try:
            _join(config, 0, port)
            self.channel = Channel(SHUTDOWN_TIMEOUT)
            self.runner = ModelRunner(config, 0)
        except BaseException:
            self._kill()
            raise

    def determine_num_kv_blocks(self) -> int:
        return self.runner.determine_num_kv_blocks()

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.channel.send(AllocateKVCache(num_blocks))
        self.runner.allocate_kv_cache(num_blocks)

    @property
    def needs_warmup(self) -> bool:
        return self.runner.needs_warmup

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.submit_model(sched)()

    def submit_model(self, sched: SchedulerOutput) -> Callable[[], ModelRunnerOutput]:
        """Queues the step on every rank (ModelRunner.submit_model); the workers queue theirs
        once they have waited for the steps rank 0 waited for before it."""
        if dead := self._dead_workers():
            raise RuntimeError(f"tensor-parallel workers exited: {', '.join(dead)}")
        self.channel.send(ExecuteModel(sched, self.waited))
        wait = self.runner.submit_model(sched)
        # An empty step is waited for at once (EngineCore._submit), possibly before the step in
        # flight: not counted, as workers run it at once too, so both wait in queue order.
        return wait if sched.is_empty else _CountedWait(wait, self)

    def start_profile(self) -> None:
        self.channel.send(Profile(start=True))
        self.runner.start_profile()

    def stop_profile(self) -> None:
        self.channel.send(Profile(start=False))
        self.runner.stop_profile()

    def shutdown(self) -> None:
        """Every rank leaves the process group at once (SHUTDOWN_TIMEOUT's comment), then the
        workers exit; one that does not within 30 s is killed."""
        if self._closed:
            return
        self._closed = True
        dead = self._dead_workers()
        self.runner.shutdown(sync=not dead)  # a replay may wait for a dead rank forever
        if dead:
            self._kill()
            return
        try:
            self.channel.send(Shutdown())
            self.channel.barrier()
        except Exception:
            logger.exception("tensor-parallel shutdown: a worker did not answer; killing them")
            self._kill()
            return
        leave_tensor_parallel()
        for p in self.workers:
            p.join(timeout=30)
        self._kill()

    def _dead_workers(self) -> list[str]:
        return [p.name for p in self.workers if p.exitcode is not None]

    def _kill(self) -> None:
        """Stop every worker and leave the process group (also after a failed start): aborted
        where a worker died or had to be killed, since a finalize would wait for it."""
        self._closed = True
        for p in self.workers:
            if p.is_alive():
                p.kill()
            p.join()
        if (channel := getattr(self, "channel", None)) is not None:
            channel.close()
        leave_tensor_parallel(abort=any(p.exitcode != 0 for p in self.workers))
