"""Tensor parallelism: one process per rank, rank 0 inside the engine-core process.

Rank 0 broadcasts each command (a typed message, pickled over a gloo group) to the worker ranks;
every rank then runs the same ModelRunner call on its shard, so the collectives inside the model
(all-reduce after row-parallel layers, all-gather of logits, broadcast of sampled ids) line up.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass

import torch.distributed as dist

from atom.config import EngineConfig
from atom.distributed import free_port, init_tensor_parallel
from atom.engine.outputs import ModelRunnerOutput, SchedulerOutput
from atom.executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AllocateKVCache:
    num_blocks: int


@dataclass(frozen=True, slots=True)
class ExecuteModel:
    sched: SchedulerOutput


@dataclass(frozen=True, slots=True)
class Profile:
    start: bool  # start or stop the torch profiler


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


Command = AllocateKVCache | ExecuteModel | Profile | Shutdown


class _Channel:
    """Commands from rank 0 to every rank, over a CPU (gloo) group even when the model runs on
    NCCL, so that waiting for the next command never occupies a GPU stream."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo")

    def send(self, command: Command) -> None:
        dist.broadcast_object_list([command], src=0, group=self.group)

    def recv(self) -> Command:
        box: list[Command | None] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        assert box[0] is not None
        return box[0]


def _worker_main(config: EngineConfig, rank: int, port: int) -> None:
    init_tensor_parallel(rank, config.parallel.world_size, port, config.device)
    channel = _Channel()
    runner = ModelRunner(config, rank)
    runner.determine_num_kv_blocks()  # a collective: every rank takes part
    while True:
        command = channel.recv()
        if isinstance(command, Shutdown):
            break
        try:
            if isinstance(command, AllocateKVCache):
                runner.allocate_kv_cache(command.num_blocks)
            elif isinstance(command, Profile):
                runner.start_profile() if command.start else runner.stop_profile()
            else:
                runner.execute_model(command.sched)
        except Exception:
            # Input-dependent failures hit every rank alike; rank 0 reports them, we go on.
            logger.exception("rank %d: %s failed", rank, type(command).__name__)
    dist.destroy_process_group()


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
        try:
            init_tensor_parallel(0, world, port, config.device)
            self.channel = _Channel()
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
        self.channel.send(ExecuteModel(sched))
        return self.runner.execute_model(sched)

    def start_profile(self) -> None:
        self.channel.send(Profile(start=True))
        self.runner.start_profile()

    def stop_profile(self) -> None:
        self.channel.send(Profile(start=False))
        self.runner.stop_profile()

    def shutdown(self) -> None:
        if self._closed:
            return
        self.channel.send(Shutdown())
        for p in self.workers:
            p.join(timeout=30)
        self._kill()

    def _kill(self) -> None:
        """Stop every worker and leave the process group (also after a failed start)."""
        self._closed = True
        for p in self.workers:
            if p.is_alive():
                p.kill()
            p.join()
        if dist.is_initialized():
            dist.destroy_process_group()
