"""AsyncLLM: the server's engine client. Tokenization, detokenization and stop strings run here, in
the front-end process; the EngineCore runs in its own process (core_proc.py), reached over ZMQ.

    front end (asyncio)                       engine-core process
    generate() -> InputProcessor ── ADD ──►   EngineCore.step() loop
    per-request queues ◄── OutputProcessor ◄── outputs + SchedulerStats (every step)

Contract for the serving layer:
- `generate(prompt, params, request_id)` validates first (ValueError before anything is queued),
  then yields RequestOutputs (cumulative text/token ids per completion, plus `delta_text`, the
  stream-safe new text); the last one has finished=True. Closing or cancelling the iterator
  (a client that disconnects) aborts the request in the engine, which frees its KV blocks.
- `errored` / `check_health()`: the core process is alive and answers.
- `stats()`: the latest SchedulerStats the core sent; `metrics` hooks see every finished request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from atom.args import EngineArgs
from atom.config import EngineConfig
from atom.engine import core_proc as cp
from atom.engine.core import freeze_long_lived_objects
from atom.engine.input_processor import InputProcessor, PromptType
from atom.engine.output_processor import OutputProcessor
from atom.engine.scheduler import SchedulerStats
from atom.model_source import load_tokenizer
from atom.outputs import RequestOutput
from atom.process_age import seconds_since_process_start
from atom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

STARTUP_POLL_S = 1.0


class EngineDeadError(RuntimeError):
    """The engine-core process failed or exited; no request can be served."""


class AsyncLLM:
    def __init__(self, args: EngineArgs) -> None:
        """Starts the engine-core process and waits until it is ready (model loaded, KV sized)."""
        self.config: EngineConfig = args.create_engine_config()
        mc = self.config.model
        self.tokenizer: Any = None
        if not args.skip_tokenizer_init:
            gguf = mc.gguf_file if mc.tokenizer == mc.model_dir else None
            self.tokenizer = load_tokenizer(mc.tokenizer, gguf, args.trust_remote_code)
        self.inputs = InputProcessor(mc, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        # Hooks the server's metrics module sets: every finished RequestOutput, every stats update.
        self.on_finished: Callable[[RequestOutput], None] | None = None
        self.on_stats: Callable[[SchedulerStats], None] | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}  # internal id
        self._internal: dict[str, str] = {}  # caller's request id -> internal id
        self._seq = itertools.count()
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._error: str | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(cp.CoreOutput)
        self._tmp = tempfile.TemporaryDirectory(prefix="atom-")
        self._ctx = zmq.Context()
        input_addr = f"ipc://{Path(self._tmp.name) / 'in'}"
        output_addr = f"ipc://{Path(self._tmp.name) / 'out'}"
        self._to_core = self._ctx.socket(zmq.PUSH)
        self._to_core.bind(input_addr)
        self._from_core = self._ctx.socket(zmq.PULL)
        self._from_core.bind(output_addr)
        self._proc = mp.get_context("spawn").Process(
            target=cp.run_engine_core,
            args=(self.config, input_addr, output_addr),
            name="atom-engine-core",
            daemon=True,
        )
        self._proc.start()
        self._handler: asyncio.Task[None] | None = None
        self._from_core_async: zmq.asyncio.Socket | None = None
        try:
            self.num_kv_blocks, self.last_stats = self._wait_ready()
        except BaseException:
            self.shutdown()
            raise
        # The server's process too: a full collection over the tokenizer, the app and the imports
        # would hold every stream's next token.
        freeze_long_lived_objects()
        since_start = seconds_since_process_start()
        if since_start is not None:
            logger.info("engine ready %.1f s after the process started", since_start)

    def _wait_ready(self) -> tuple[int, SchedulerStats]:
        while not self._from_core.poll(int(STARTUP_POLL_S * 1000)):
            if not self._proc.is_alive():
                raise EngineDeadError(f"engine core exited with code {self._proc.exitcode}")
        msg = self._decoder.decode(self._from_core.recv())
        if isinstance(msg, cp.Failed):
            raise EngineDeadError(f"engine core failed to start:\n{msg.error}")
        assert isinstance(msg, cp.Ready)
        return msg.num_kv_blocks, msg.stats

    @property
    def model_config(self) -> Any:
        return self.config.model

    @property
    def errored(self) -> bool:
        return self._error is not None or not self._proc.is_alive()

    def stats(self) -> SchedulerStats:
        return self.last_stats

    # ---- requests ----
    async def generate(
        self, prompt: PromptType, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Validate, queue, then yield outputs until finished; leaving early aborts the request.

        Inside, the request runs under an id of its own ("<seq>-<request_id>"): outputs of an
        aborted request still on their way from the core can then never reach a new request that
        reuses its id, and child ids ("<i>_<id>") cannot collide with another request's.
        """
        self._check_alive()
        processed = self.inputs.process(prompt, params)  # ValueError: nothing was queued
        if request_id in self._internal:
            raise ValueError(f"request id {request_id!r} is already running")
        self._ensure_handler()
        internal = f"{next(self._seq)}-{request_id}"
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._internal[request_id] = internal
        self._queues[internal] = queue
        arrival = time.time()
        self.output_processor.add_request(
            internal, processed.text, processed.token_ids, processed.params, arrival
        )
        for req in self.inputs.core_requests(internal, processed, arrival):
            self._send(
                cp.AddRequest(req.request_id, req.prompt_token_ids, req.sampling_params, arrival)
            )
        finished = False
        try:
            while not finished:
                item = _coalesce(await queue.get(), queue)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                item.request_id = request_id
                yield item
        finally:
            if self._queues.pop(internal, None) is not None:  # not already aborted
                if self._internal.get(request_id) == internal:
                    del self._internal[request_id]
                if not finished:  # cancelled, disconnected or failed: free its blocks now
                    self._abort(internal)

    async def abort(self, request_id: str) -> None:
        internal = self._internal.pop(request_id, None)
        if internal is None:
            return
        self._abort(internal)
        queue = self._queues.pop(internal, None)
        if queue is not None:
            queue.put_nowait(asyncio.CancelledError(f"request {request_id} aborted"))

    def _abort(self, internal: str) -> None:
        if self.on_finished is not None:  # metrics count aborted requests too
            out = self.output_processor.aborted_output(internal)
            if out is not None:
                _call_hook(self.on_finished, out)
        core_ids = self.output_processor.abort(internal)
        if core_ids and not self.errored:
            self._send(cp.AbortRequests(core_ids))

    # ---- utility calls ----
    async def check_health(self, timeout: float = 5.0) -> None:
        """Raises EngineDeadError unless the core answers within the timeout."""
        self._check_alive()
        try:
            await asyncio.wait_for(self._call(cp.Ping), timeout)
        except TimeoutError as e:
            raise EngineDeadError("engine core did not answer") from e

    async def reset_prefix_cache(self) -> bool:
        return bool(await self._call(cp.ResetPrefixCache))

    async def start_profile(self) -> None:
        await self._call(cp.StartProfile)

    async def stop_profile(self) -> None:
        await self._call(cp.StopProfile)

    async def _call(self, kind: type[cp.Utility]) -> Any:
        self._check_alive()
        self._ensure_handler()
        call_id = next(self._call_ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self._send(kind(call_id))
        return await future

    # ---- the output handler ----
    def _ensure_handler(self) -> None:
        if self._handler is None or self._handler.done():
            # The output socket, seen through asyncio from the loop that serves requests.
            self._from_core_async = zmq.asyncio.Socket.shadow(self._from_core.underlying)
            self._handler = asyncio.get_running_loop().create_task(self._handle_outputs())

    async def _handle_outputs(self) -> None:
        sock = self._from_core_async
        assert sock is not None
        try:
            while True:
                if not await sock.poll(int(STARTUP_POLL_S * 1000)):
                    if not self._proc.is_alive():
                        raise EngineDeadError(f"engine core exited ({self._proc.exitcode})")
                    continue
                msg = self._decoder.decode(await sock.recv())
                if isinstance(msg, cp.Outputs):
                    self._dispatch(msg)
                elif isinstance(msg, cp.UtilityResult):
                    self._resolve(msg)
                elif isinstance(msg, cp.Failed):
                    raise EngineDeadError(f"engine core failed:\n{msg.error}")
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._fail_all(e)

    def _dispatch(self, msg: cp.Outputs) -> None:
        self.last_stats = msg.stats
        if self.on_stats is not None:
            _call_hook(self.on_stats, msg.stats)
        results, to_finish = self.output_processor.process(msg.outputs)
        if to_finish:
            self._send(cp.FinishRequests(to_finish))
        for out in results:
            if out.finished and self.on_finished is not None:
                _call_hook(self.on_finished, out)
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _resolve(self, msg: cp.UtilityResult) -> None:
        future = self._calls.pop(msg.call_id, None)
        if future is None or future.done():
            return
        if msg.error is not None:
            future.set_exception(ValueError(msg.error))
        else:
            future.set_result(msg.result)

    def _fail_all(self, error: BaseException, expected: bool = False) -> None:
        self._error = str(error)
        if not expected:
            logger.error("engine core is dead: %s", error)
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(str(error))
        for queue in self._queues.values():
            queue.put_nowait(dead)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(dead)
        self._calls.clear()

    def _check_alive(self) -> None:
        if self.errored:
            raise EngineDeadError(self._error or "engine core is not running")

    def _send(self, msg: cp.CoreInput) -> None:
        self._to_core.send(self._encoder.encode(msg), copy=False)

    # ---- lifetime ----
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core process (and its tensor-parallel workers); idempotent."""
        if self._handler is not None and not self._handler.done():
            self._handler.cancel()
        if self._error is None:
            self._fail_all(EngineDeadError("the engine was shut down"), expected=True)
        if self._proc.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self._send(cp.Shutdown())
            self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._to_core.close(linger=0)
        self._from_core.close(linger=0)
        self._ctx.term()
        self._tmp.cleanup()


def _call_hook(hook: Callable[[Any], None], arg: Any) -> None:
    """A failing observer (metrics) must not take the engine's output path down with it."""
    try:
        hook(arg)
    except Exception:
        logger.exception("hook %r failed", hook)


def _coalesce(
    item: RequestOutput | BaseException, queue: asyncio.Queue[RequestOutput | BaseException]
) -> RequestOutput | BaseException:
    """A consumer that fell behind gets one output for all the steps it missed: outputs are
    cumulative but for delta_text, which is joined. Under load this makes a stream chunk carry
    several tokens instead of costing the front end a chunk per token."""
    while not queue.empty() and isinstance(item, RequestOutput) and not item.finished:
        newer = queue.get_nowait()
        if isinstance(newer, RequestOutput):
            for old, new in zip(item.outputs, newer.outputs, strict=True):
                new.delta_text = old.delta_text + new.delta_text
        item = newer
    return item
