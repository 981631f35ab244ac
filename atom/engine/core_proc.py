"""The engine core in its own process, and the messages it exchanges with the front end.

Front end ──PUSH──► [ADD | ABORT | FINISH | Utility | SHUTDOWN] ──PULL──► core loop
Front end ◄──PULL── [Ready | Outputs(+stats) | UtilityResult | Failed] ◄──PUSH── core loop

Messages are msgspec structs (msgpack on the wire). The core never sees text: it gets token ids and
SamplingParams, and sends back token ids, logprobs and scheduler stats after every step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import traceback
from typing import Any

import msgspec
import zmq

from atom.config import EngineConfig
from atom.engine.core import EngineCore
from atom.engine.gc_defer import (
    collect_if_due,
    defer_full_collections,
    restore_full_collections,
)
from atom.engine.outputs import EngineCoreOutput
from atom.engine.request import Request
from atom.engine.scheduler import SchedulerStats
from atom.engine.stats_logger import StatsLogger
from atom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 500
PR_SET_PDEATHSIG = 1


# ---- front end -> core ----
class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float


class AbortRequests(msgspec.Struct, tag=True):
    request_ids: list[str]


class FinishRequests(msgspec.Struct, tag=True):
    """Requests ended by a stop string, which only the front end can see."""

    request_ids: list[str]


class Ping(msgspec.Struct, tag=True):
    call_id: int


class ResetPrefixCache(msgspec.Struct, tag=True):
    call_id: int


class StartProfile(msgspec.Struct, tag=True):
    call_id: int


class StopProfile(msgspec.Struct, tag=True):
    call_id: int


class Shutdown(msgspec.Struct, tag=True):
    pass


Utility = Ping | ResetPrefixCache | StartProfile | StopProfile
CoreInput = AddRequest | AbortRequests | FinishRequests | Utility | Shutdown


# ---- core -> front end ----
class Ready(msgspec.Struct, tag=True):
    num_kv_blocks: int
    stats: SchedulerStats


class Outputs(msgspec.Struct, tag=True):
    outputs: list[EngineCoreOutput]
    stats: SchedulerStats


class UtilityResult(msgspec.Struct, tag=True):
    call_id: int
    result: Any = None
    error: str | None = None


class Failed(msgspec.Struct, tag=True):
    error: str


CoreOutput = Ready | Outputs | UtilityResult | Failed


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str) -> None:
    """Process entry point: build the core, then serve until Shutdown or the parent is gone."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parent = os.getppid()
    ctx = zmq.Context()
    inbox, outbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    inbox.connect(input_addr)
    outbox.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    try:
        core = EngineCore(config)
    except BaseException:
        outbox.send(encoder.encode(Failed(traceback.format_exc())))
        outbox.close(linger=1000)
        return
    try:
        outbox.send(encoder.encode(Ready(core.num_kv_blocks, core.stats())))
        _CoreLoop(core, inbox, outbox, parent).run()
    except BaseException:
        logger.exception("engine core failed")
        outbox.send(encoder.encode(Failed(traceback.format_exc())))
    finally:
        core.shutdown()
        outbox.close(linger=1000)
        inbox.close(linger=0)


class _CoreLoop:
    def __init__(
        self, core: EngineCore, inbox: zmq.Socket, outbox: zmq.Socket, parent: int
    ) -> None:
        self.core = core
        self.inbox, self.outbox = inbox, outbox
        self.parent = parent
        self.decoder = msgspec.msgpack.Decoder(CoreInput)
        self.encoder = msgspec.msgpack.Encoder()
        self.eos = config_eos(core.config)
        self.running = True
        self.stale_stats = False  # scheduler state changed since the last stats sent
        self.stats_logger = StatsLogger(core.stats()) if core.config.log_stats else None

    def run(self) -> None:
        while self.running:
            busy = self.core.has_work()
            if busy:
                defer_full_collections()  # while requests run (gc_defer.py)
            else:
                restore_full_collections()
                collect_if_due()  # a full collection deferred while busy: nothing waits now
            if self.inbox.poll(0 if busy else IDLE_POLL_MS):
                while self.running and self.inbox.poll(0):
                    self._handle(self.decoder.decode(self.inbox.recv()))
            if os.getppid() != self.parent:  # a getppid per step costs ~1 us
                logger.warning("front end is gone: engine core exits")
                return
            stepped = self.running and self.core.has_work()
            outputs = self.core.step() if stepped else None
            if outputs is None and self.running and self.stale_stats:
                outputs = []  # an abort on an idle core freed blocks: the front end hears of it
            if outputs is None and self.stats_logger is None:
                continue
            stats = self.core.stats()
            if outputs is not None:
                self.outbox.send(self.encoder.encode(Outputs(outputs, stats)))
                self.stale_stats = False
            if self.stats_logger is not None:
                self.stats_logger.update(stats, stepped)

    def _handle(self, msg: CoreInput) -> None:
        core = self.core
        self.stale_stats = True
        if isinstance(msg, AddRequest):
            params = msg.params.clone(_eos_token_ids=self.eos)  # private field: not on the wire
            req = Request(msg.request_id, msg.prompt_token_ids, params, msg.arrival_time)
            try:
                core.add_request(req)
            except ValueError:  # the front end checks ids; never let one request end the core
                logger.exception("rejected request %s", msg.request_id)
        elif isinstance(msg, AbortRequests):
            core.abort_requests(msg.request_ids)
        elif isinstance(msg, FinishRequests):
            core.finish_requests(msg.request_ids)
        elif isinstance(msg, Shutdown):
            self.running = False
        else:
            self._utility(msg)

    def _utility(self, msg: Utility) -> None:
        result: Any = None
        error = None
        try:
            if isinstance(msg, ResetPrefixCache):
                result = self.core.reset_prefix_cache()
            elif isinstance(msg, StartProfile):
                self.core.start_profile()
            elif isinstance(msg, StopProfile):
                self.core.stop_profile()
        except Exception as e:  # reported to the caller; the core keeps serving
            error = f"{type(e).__name__}: {e}"
        self.outbox.send(self.encoder.encode(UtilityResult(msg.call_id, result, error)))


def config_eos(config: EngineConfig) -> tuple[int, ...]:
    return tuple(config.model.eos_token_ids)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, even in the middle of a step (a blocked
    send to a dead front end would otherwise hold the GPU forever)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        logger.debug("prctl unavailable: relying on the parent check of the core loop")
