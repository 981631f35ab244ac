"""One streamed request of the serving benchmark, timed on the client (aiohttp).

Every request streams with `stream_options.include_usage`. A *token chunk* is an SSE chunk with
`choices`: for completions any such chunk (its text may be empty, e.g. a special token), for chat
any but the role-only first chunk (`{"role": "assistant", "content": ""}`), which servers send
before or with the first token and which carries none. Then, as in vLLM's benchmark:
  TTFT = first token chunk - send; ITL = gaps between token chunks; E2EL = last token chunk - send;
  output tokens = `usage.completion_tokens` (None when the server sends no usage; the metrics then
  count the text with the tokenizer).
A request fails, with its error text, on a connection error, an HTTP status other than 200 (the
message of an OpenAI error body), an error chunk in the stream, a stream without a token chunk, or
a stream that ends without `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from atom.benchmarks.serving_datasets import BenchmarkRequest

COMPLETIONS_BACKENDS = ("vllm", "openai", "sglang", "lmdeploy", "scalellm")
CHAT_BACKENDS = ("openai-chat",)
BACKENDS = COMPLETIONS_BACKENDS + CHAT_BACKENDS
# Error bodies that are not JSON are cut to this many characters.
MAX_ERROR_BODY = 500


def default_endpoint(backend: str) -> str:
    return "/v1/chat/completions" if backend in CHAT_BACKENDS else "/v1/completions"


@dataclass(slots=True)
class RequestResult:
    prompt_len: int
    success: bool = False
    generated_text: str = ""
    output_tokens: int | None = None  # usage.completion_tokens
    ttft: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds between token chunks
    latency: float = 0.0  # E2EL, seconds
    error: str = ""


@dataclass(frozen=True, slots=True)
class ClientConfig:
    api_url: str
    model: str  # the name sent as "model"
    chat: bool
    api_key: str | None = None
    ignore_eos: bool = False
    logprobs: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


class StreamError(Exception):
    """The server answered 200 but the stream is not a complete, well-formed one."""


def payload(cfg: ClientConfig, request: BenchmarkRequest) -> dict[str, Any]:
    """Greedy, streamed, usage included; the completions body is the reference's."""
    body: dict[str, Any] = {"model": cfg.model, "temperature": 0.0}
    if cfg.chat:
        body["messages"] = [{"role": "user", "content": request.prompt}]
        body["max_completion_tokens"] = request.output_len
        if cfg.logprobs is not None:
            body.update(logprobs=True, top_logprobs=cfg.logprobs)
    else:
        body["prompt"] = request.prompt
        body["max_tokens"] = request.output_len
        if cfg.logprobs is not None:
            body["logprobs"] = cfg.logprobs
    body.update(stream=True, stream_options={"include_usage": True})
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return body


async def send_request(
    session: aiohttp.ClientSession, cfg: ClientConfig, request: BenchmarkRequest
) -> RequestResult:
    """Never raises (but for cancellation): a failure is a result with `error` set."""
    result = RequestResult(prompt_len=request.prompt_len)
    body = payload(cfg, request)
    start = time.perf_counter()
    try:
        async with session.post(cfg.api_url, json=body, headers=cfg.headers) as response:
            if response.status != 200:
                result.error = http_error(response.status, await response.text(errors="replace"))
                return result
            await _read_stream(response.content, cfg.chat, result, start)
    except Exception as e:
        result.error = describe(e)
    return result


async def _read_stream(
    content: aiohttp.StreamReader, chat: bool, result: RequestResult, start: float
) -> None:
    first: float | None = None
    last = start
    done = False
    async for now, data in sse_events(content):
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            raise StreamError(f"unexpected stream chunk: {data[:MAX_ERROR_BODY]}")
        if "error" in chunk:
            raise StreamError(f"error in stream: {_error_message(chunk)}")
        choices = chunk.get("choices")
        if choices and _is_token_chunk(choices[0], chat):
            if first is None:
                first = now
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
            result.generated_text += _text(choices[0], chat)
        usage = chunk.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            result.output_tokens = int(usage["completion_tokens"])
    if not done:
        raise StreamError("the stream ended without data: [DONE]")
    if first is None:
        raise StreamError("the stream held no token chunk")
    result.latency = last - start
    result.success = True


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[float, str]]:
    """The `data:` payload of each server-sent event, with the time its bytes arrived; events of
    one read share that time. Lines are never size-limited (one event may carry many tokens)."""
    buffer = b""
    async for piece in content.iter_any():
        now = time.perf_counter()
        # On the whole buffer: a "\r\n" split over two reads is joined first.
        buffer = (buffer + piece).replace(b"\r\n", b"\n")
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[:end], buffer[end + 2 :]
            lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
            if lines:
                yield now, b"\n".join(line.removeprefix(b" ") for line in lines).decode()
    if buffer.strip().startswith(b"data:"):  # a last event without its blank line
        yield time.perf_counter(), buffer.strip()[5:].strip().decode()


def _is_token_chunk(choice: dict[str, Any], chat: bool) -> bool:
    if not chat:
        return True
    delta = choice.get("delta") or {}
    role_only = "role" in delta and not any(
        delta.get(k) for k in ("content", "reasoning_content", "reasoning", "tool_calls")
    )
    return not (role_only and choice.get("finish_reason") is None)


def _text(choice: dict[str, Any], chat: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
    return reasoning + (delta.get("content") or "")


def _error_message(body: Any) -> str:
    """The message of an OpenAI error body ({"error": {"message": ...}}) or of FastAPI's
    ({"detail": ...}); the body itself otherwise."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            for key in ("message", "detail", "msg"):
                if error.get(key):
                    return str(error[key])
        elif isinstance(error, str):
            return error
    return json.dumps(body)[:MAX_ERROR_BODY]


def http_error(status: int, text: str) -> str:
    try:
        message = _error_message(json.loads(text))
    except ValueError:
        message = text.strip()[:MAX_ERROR_BODY]
    return f"HTTP {status}: {message}" if message else f"HTTP {status}"


def describe(e: BaseException) -> str:
    """One line that names the error: the same failure gives the same text, so they count up."""
    if isinstance(e, StreamError):
        return str(e)
    if isinstance(e, asyncio.TimeoutError):
        return "TimeoutError: no answer within --request-timeout"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


async def post_control(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> str | None:
    """POST to a control route (/start_profile, /stop_profile): None, or what went wrong."""
    try:
        async with session.post(url, headers=headers) as response:
            text = await response.text(errors="replace")
            return None if response.status == 200 else http_error(response.status, text)
    except Exception as e:
        return describe(e)
