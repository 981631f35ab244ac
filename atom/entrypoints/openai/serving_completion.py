"""POST /v1/completions, plus what chat completions share with it (OpenAIServing, SSE, merging).

A request with several prompts (or n > 1) runs as one engine request per prompt; choice index is
prompt_index * n + i. Everything that can be wrong with a request is checked before the first
engine request is queued, so a bad request never leaves work behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from atom.engine.async_llm import AsyncLLM
from atom.entrypoints.openai.protocol import CompletionRequest, OpenAIError, UsageInfo, error_body
from atom.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from atom.sampling_params import SamplingParams

T = TypeVar("T")

logger = logging.getLogger(__name__)


class SSEResponse(StreamingResponse):
    """Server-sent events whose generator is always closed, so a disconnect aborts the request.

    Under ASGI 2.4 Starlette stops at the failed write and leaves the generator suspended; closing
    it here frees the engine's KV blocks now instead of whenever the generator is collected.
    """

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream")

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def merge(
    gens: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several engine requests as they come; leaving early closes (aborts) them all."""
    if len(gens) == 1:  # the common case: no pump task and queue between engine and stream
        try:
            async for out in gens[0]:
                yield 0, out
        finally:
            await gens[0].aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            await gen.aclose()  # type: ignore[attr-defined]

    tasks = [asyncio.create_task(pump(i, gen)) for i, gen in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnect(coro: Any, raw: Request) -> Any:
    """Await coro, cancelling it (and so aborting its requests) the moment the client goes away.

    The body is read by now, so the next ASGI message is the disconnect: waiting on it costs no
    polling and no latency.
    """
    task = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_disconnect(raw))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise OpenAIError("client disconnected", 499, "ClientDisconnected")
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t


async def _disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def stream_error(e: Exception) -> str:
    logger.warning("stream failed: %s", e)
    status = 400 if isinstance(e, ValueError) else 500
    return sse(error_body(str(e), status, type(e).__name__))


# Threads that prepare requests (tokenize, render chat templates). A fast tokenizer's encode runs
# in Rust without the GIL (transformers goes through its batch encode) and only reads the shared
# tokenizer (transformers writes to it only to change truncation or padding, which no request
# does), so K threads encode K prompts at once: 922-token prompts on a 2-core machine, 1.85 ms
# each in one thread, 0.83 in two. One thread held a burst of requests in a queue: on the GPU
# host 256 prompts arrived ~2 ms apart, half a second before the last one's prefill (RESULTS,
# twenty-eighth sitting).
TOKENIZER_THREADS = max(1, min(8, os.cpu_count() or 1))


class OpenAIServing:
    """What every generation endpoint needs: the engine, the model name, checks, logging."""

    def __init__(self, llm: AsyncLLM, model_name: str, max_log_len: int | None) -> None:
        self.llm = llm
        self.model_name = model_name
        self.max_log_len = max_log_len
        self.max_model_len: int = llm.config.model.max_model_len
        # The model's generation_config.json sampling values, under each request's own.
        self.sampling_defaults = dict(llm.config.model.sampling_defaults)
        # Tokenizing a large body or rendering a template takes long: off the event loop, so
        # streams and /health go on meanwhile; in several threads, so that a burst of requests
        # is admitted at the cores' pace (TOKENIZER_THREADS).
        self._tokenizer_threads = ThreadPoolExecutor(
            TOKENIZER_THREADS, thread_name_prefix="atom-tokenize"
        )

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_threads, fn, *args)

    @staticmethod
    def request_id(prefix: str, raw: Request) -> str:
        return f"{prefix}-{raw.headers.get('x-request-id') or uuid.uuid4().hex}"

    @staticmethod
    def engine_id(request_id: str, i: int) -> str:
        # Unique even when clients reuse an X-Request-Id for concurrent requests.
        return f"{request_id}-{i}-{uuid.uuid4().hex[:8]}"

    def max_tokens(self, requested: int | None, prompt_len: int, param: str) -> int:
        """The completion budget; a prompt or request that cannot fit is the client's error."""
        limit = self.max_model_len
        if prompt_len > limit:
            raise OpenAIError(
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"has {prompt_len} tokens.",
                param="prompt",
            )
        if requested is None:
            if prompt_len >= limit:
                raise OpenAIError(
                    f"the prompt ({prompt_len} tokens) leaves no room to generate in the "
                    f"context of {limit} tokens",
                    param="prompt",
                )
            return limit - prompt_len
        if requested < 0:
            raise OpenAIError(f"{param} must be >= 0, got {requested}", param=param)
        if prompt_len + requested > limit:
            raise OpenAIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in "
                "the completion). Please reduce the prompt or the completion length.",
                param=param,
            )
        return requested

    def validate(self, prompt: dict[str, Any], params: SamplingParams) -> None:
        """The engine's own input checks (ValueError -> 400) before anything is queued."""
        self.llm.inputs.process(prompt, params)

    def log_request(self, request_id: str, prompt: Any, params: SamplingParams) -> None:
        text = repr(prompt)
        if self.max_log_len is not None:
            text = text[: self.max_log_len]
        logger.info("received request %s: prompt=%s, params=%s", request_id, text, params)

    def decode_token(self, token_id: int) -> str:
        return self.llm.tokenizer.decode([token_id])


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, request: CompletionRequest, raw: Request) -> Response:
        request_id = self.request_id("cmpl", raw)
        if request.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")
        echo_only = request.max_tokens == 0
        if echo_only and not request.echo:
            raise OpenAIError("max_tokens must be >= 1 (0 only with echo)", param="max_tokens")
        prompts, engine_prompts, params = await self.off_loop(self._prepare, request)
        for i, (prompt, p) in enumerate(zip(engine_prompts, params, strict=True)):
            self.log_request(f"{request_id}-{i}", prompt.get("prompt", prompt), p)
        gens = [
            self.llm.generate(prompt, p, self.engine_id(request_id, i))
            for i, (prompt, p) in enumerate(zip(engine_prompts, params, strict=True))
        ]
        view = _CompletionView(self, request, request_id, prompts, echo_only)
        if request.stream:
            return SSEResponse(view.stream(merge(gens)))
        finals = await until_disconnect(view.collect(merge(gens)), raw)
        return JSONResponse(view.response(finals))

    def _prepare(
        self, request: CompletionRequest
    ) -> tuple[list[tuple[str, list[int]]], list[dict[str, Any]], list[SamplingParams]]:
        raw_prompts = request.prompt
        if isinstance(raw_prompts, str) or (raw_prompts and isinstance(raw_prompts[0], int)):
            raw_prompts = [raw_prompts]  # type: ignore[list-item]
        if not raw_prompts:
            raise OpenAIError("prompt must not be empty", param="prompt")
        prompts, engine_prompts, params = [], [], []
        for item in raw_prompts:
            if isinstance(item, str):
                text, ids = item, list(self.llm.tokenizer.encode(item))
                engine_prompt = {"prompt": text, "prompt_token_ids": ids}
            else:
                ids = list(item)
                engine_prompt = {"prompt_token_ids": ids}
                self.validate(engine_prompt, SamplingParams())  # ids in the vocabulary
                text = self.llm.tokenizer.decode(ids) if request.echo else ""
            max_tokens = self.max_tokens(request.max_tokens, len(ids), "max_tokens")
            p = SamplingParams(
                **(self.sampling_defaults | request.sampling_kwargs()),
                max_tokens=max(max_tokens, 1),  # echo with 0: one token, dropped
                logprobs=request.logprobs,
                prompt_logprobs=request.logprobs if request.echo else None,
            )
            self.validate(engine_prompt, p)
            prompts.append((text, ids))
            engine_prompts.append(engine_prompt)
            params.append(p)
        return prompts, engine_prompts, params


class _CompletionView:
    """Turns engine outputs of one completion request into OpenAI JSON, whole or streamed."""

    def __init__(
        self,
        serving: OpenAIServingCompletion,
        request: CompletionRequest,
        request_id: str,
        prompts: list[tuple[str, list[int]]],
        echo_only: bool,
    ) -> None:
        self.s, self.req, self.id = serving, request, request_id
        self.prompts, self.echo_only = prompts, echo_only
        self.created = int(time.time())

    async def collect(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> list[Any]:
        finals: list[Any] = [None] * len(self.prompts)
        async for i, out in outputs:
            finals[i] = out
        return finals

    def response(self, finals: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                text, logprobs = self._part(i, out, c.text, c.token_ids, c.logprobs, True, 0)
                choices.append(self._choice(i, c.index, text, logprobs, c))
        return self._chunk(choices, usage=self._usage(finals).model_dump())

    async def stream(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        sent: dict[tuple[int, int], int] = {}  # choice -> tokens already streamed
        offsets: dict[tuple[int, int], int] = {}  # choice -> text already streamed
        finals: list[Any] = [None] * len(self.prompts)
        try:
            async for i, out in outputs:
                finals[i] = out
                for c in out.outputs:
                    key = (i, c.index)
                    first, start = key not in sent, sent.get(key, 0)
                    if first and self._prompt_logprobs_pending(i, out):
                        continue  # a partial prefill: the echo waits for all prompt logprobs
                    new_ids = c.token_ids[start:]
                    if not (first or new_ids or c.delta_text or c.finish_reason):
                        continue
                    positions = c.logprobs[start:] if c.logprobs is not None else None
                    offset = offsets.get(key, 0)
                    text, logprobs = self._part(
                        i, out, c.delta_text, new_ids, positions, first, offset
                    )
                    sent[key], offsets[key] = len(c.token_ids), offset + len(text)
                    yield sse(self._chunk([self._choice(i, c.index, text, logprobs, c)]))
            if self.req.include_usage:
                yield sse(self._chunk([], usage=self._usage(finals).model_dump()))
        except Exception as e:
            yield stream_error(e)
        yield SSE_DONE

    def _prompt_logprobs_pending(self, i: int, out: RequestOutput) -> bool:
        if not self.req.echo or self.req.logprobs is None:
            return False
        return len(out.prompt_logprobs or []) < len(self.prompts[i][1])

    def _part(
        self,
        i: int,
        out: RequestOutput,
        gen_text: str,
        token_ids: list[int],
        positions: list[PositionLogprobs] | None,
        with_echo: bool,
        offset: int,
    ) -> tuple[str, dict[str, Any] | None]:
        """Text (and logprobs) of one choice: the echoed prompt first, then the generated part."""
        text, ids = "", []
        all_positions: list[PositionLogprobs | None] = []
        if with_echo and self.req.echo:
            text, ids = self.prompts[i][0], list(self.prompts[i][1])
            all_positions = list(out.prompt_logprobs or [None] * len(ids))
        if not self.echo_only:
            text += gen_text
            ids += token_ids
            all_positions += list(positions or [None] * len(token_ids))
        if self.req.logprobs is None:
            return text, None
        return text, completion_logprobs(self.s, ids, all_positions, self.req.logprobs, offset)

    def _choice(
        self, i: int, j: int, text: str, logprobs: dict[str, Any] | None, c: CompletionOutput
    ) -> dict[str, Any]:
        finish = c.finish_reason
        if self.echo_only and finish is not None:
            finish = "length"  # max_tokens=0: the one token the engine made is not shown
        return {
            "index": i * self.req.n + j,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": None if self.echo_only else c.stop_reason,
        }

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.s.model_name,
            "choices": choices,
            **extra,
        }

    def _usage(self, finals: list[RequestOutput | None]) -> UsageInfo:
        done = [out for out in finals if out is not None]
        prompt = sum(len(out.prompt_token_ids) for out in done)
        gen = 0 if self.echo_only else sum(len(c.token_ids) for o in done for c in o.outputs)
        return UsageInfo.of(prompt, gen, sum(out.num_cached_tokens for out in done))


def completion_logprobs(
    serving: OpenAIServing,
    token_ids: list[int],
    positions: list[PositionLogprobs | None],
    num_top: int,
    offset: int,
) -> dict[str, Any]:
    """The legacy completions logprobs object; a position without logprobs (the first prompt
    token) gets null."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for token_id, position in zip(token_ids, positions, strict=True):
        entry = position.get(token_id) if position else None
        token = entry.decoded_token if entry and entry.decoded_token is not None else None
        token = token if token is not None else serving.decode_token(token_id)
        tokens.append(token)
        token_logprobs.append(entry.logprob if entry else None)
        if position is None:
            top_logprobs.append(None)
        else:
            top_logprobs.append(
                {
                    (lp.decoded_token or serving.decode_token(tid)): lp.logprob
                    for tid, lp in position.items()
                    if tid == token_id or (lp.rank is not None and lp.rank <= num_top)
                }
            )
        text_offset.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }
