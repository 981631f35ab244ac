"""The FastAPI app: routes, API-key check, body limit, OpenAI-shaped errors, engine lifetime.

Every error a client can cause is a 4xx with {"error": {message, type, param, code}}; a 500 means a
bug in the server and is logged with its traceback. The lifespan's exit stops the engine-core
process, so that uvicorn's graceful shutdown (SIGINT/SIGTERM) leaves no process behind.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import atom
from atom.engine.async_llm import AsyncLLM, EngineDeadError
from atom.entrypoints.openai.metrics import ServerMetrics
from atom.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    OpenAIError,
    TokenizeRequest,
    error_body,
)
from atom.entrypoints.openai.serving_chat import OpenAIServingChat
from atom.entrypoints.openai.serving_completion import OpenAIServingCompletion

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20


@dataclass(frozen=True, slots=True)
class ServerArgs:
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    max_log_len: int | None = None
    chat_template: str | None = None  # file path or inline Jinja
    default_chat_template_kwargs: dict[str, Any] | None = None
    trust_request_chat_template: bool = False
    timeout_keep_alive: int = 5
    disable_uvicorn_access_log: bool = False
    max_request_body_bytes: int = MAX_BODY_BYTES


def error_response(status: int, message: str, err_type: str, param: str | None = None) -> Response:
    return JSONResponse(error_body(message, status, err_type, param), status_code=status)


class BodyLimit:
    """Pure ASGI: rejects bodies above the limit with 413, by header or (chunked) as they come."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                return await self._reject(scope, receive, send)
            return await self.app(scope, receive, send)  # the server holds it to its length
        # No length given: read the body here, so that the app never sees an oversized one.
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return await self._reject(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Any, receive: Any, send: Any) -> None:
        message = f"request body exceeds {self.limit} bytes"
        await error_response(413, message, "RequestEntityTooLarge")(scope, receive, send)


class AuthAndRequestId:
    """Pure ASGI (BaseHTTPMiddleware would hide client disconnects from the routes): checks the
    Bearer key on /v1 routes and echoes X-Request-Id."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key is not None else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if (
            self.expected is not None
            and scope["path"].startswith("/v1")
            and headers.get(b"authorization") != self.expected
        ):
            response = error_response(401, "invalid or missing API key", "AuthenticationError")
            return await response(scope, receive, send)
        request_id = headers.get(b"x-request-id")
        if request_id is None:
            return await self.app(scope, receive, send)

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _served_check(names: list[str], model: str | None) -> None:
    if model is not None and model not in names:
        raise OpenAIError(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")


def build_app(llm: AsyncLLM, args: ServerArgs) -> FastAPI:
    mc = llm.config.model
    names = [mc.served_model_name or mc.model]
    metrics = ServerMetrics(names[0], llm.num_kv_blocks)
    if mc.sampling_defaults:
        logger.info(
            "sampling defaults from the model's generation_config.json: %s "
            "(--generation-config vllm ignores them)",
            dict(mc.sampling_defaults),
        )
    llm.on_finished = metrics.on_finished
    completion = OpenAIServingCompletion(llm, names[0], args.max_log_len)
    chat = OpenAIServingChat(
        llm,
        names[0],
        args.max_log_len,
        args.chat_template,
        args.default_chat_template_kwargs,
        args.trust_request_chat_template,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            logger.info("shutting down the engine core")
            llm.shutdown()

    app = FastAPI(
        title="ATOM OpenAI-compatible server", version=atom.__version__, lifespan=lifespan
    )
    _install_errors(app)

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw: Request) -> Response:
        _served_check(names, request.model)
        return await completion.create(request, raw)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw: Request) -> Response:
        _served_check(names, request.model)
        return await chat.create(request, raw)

    @app.get("/v1/models")
    async def show_models() -> ModelList:
        cards = [ModelCard(id=n, root=mc.model, max_model_len=mc.max_model_len) for n in names]
        return ModelList(data=cards)

    @app.get("/health")
    async def health() -> Response:
        try:
            await llm.check_health()
        except EngineDeadError as e:
            return error_response(503, f"engine is not healthy: {e}", "ServiceUnavailable")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": atom.__version__}

    @app.get("/metrics")
    async def show_metrics() -> Response:
        return Response(metrics.render(llm.stats()), media_type=metrics.content_type)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> dict[str, Any]:
        _served_check(names, request.model)
        if (request.prompt is None) == (request.messages is None):
            raise OpenAIError("give exactly one of prompt or messages", param="prompt")
        if request.messages is not None:
            _, tokens = chat.render(
                request.messages, request.add_generation_prompt, None, request.chat_template_kwargs
            )
        else:
            encode = llm.tokenizer.encode
            tokens = list(encode(request.prompt, add_special_tokens=request.add_special_tokens))
        return {"tokens": tokens, "count": len(tokens), "max_model_len": mc.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> dict[str, str]:
        _served_check(names, request.model)
        bad = [t for t in request.tokens if not 0 <= t < mc.vocab_size]
        if bad:
            raise OpenAIError(f"token id {bad[0]} is outside the vocabulary", param="tokens")
        return {"prompt": llm.tokenizer.decode(request.tokens)}

    @app.post("/start_profile")
    async def start_profile() -> dict[str, str]:
        await llm.start_profile()
        return {"status": "success", "message": "Profiling started"}

    @app.post("/stop_profile")
    async def stop_profile() -> dict[str, str]:
        await llm.stop_profile()
        return {"status": "success", "message": "Profiling stopped"}

    app.add_middleware(BodyLimit, limit=args.max_request_body_bytes)
    app.add_middleware(AuthAndRequestId, api_key=args.api_key)
    app.state.llm, app.state.metrics = llm, metrics
    return app


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, e: OpenAIError) -> Response:
        return error_response(e.status_code, e.message, e.err_type, e.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> Response:
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            detail = errors[0].get("ctx", {}).get("error", "")
            return error_response(400, f"malformed JSON body: {detail}".strip(), "BadRequestError")
        parts, params = [], []
        for err in errors[:5]:
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {err.get('msg')}")
            params.append(loc)
        message = "; ".join(parts) or "invalid request"
        return error_response(400, message, "BadRequestError", params[0] if params else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> Response:
        phrase = HTTPStatus(e.status_code).phrase.replace(" ", "")
        return error_response(e.status_code, str(e.detail), phrase)

    @app.exception_handler(ValueError)
    async def value_error(_: Request, e: ValueError) -> Response:
        return error_response(400, str(e), "BadRequestError")

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, e: EngineDeadError) -> Response:
        return error_response(503, str(e), "ServiceUnavailable")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> Response:
        logger.exception("internal error on %s", request.url.path)
        return error_response(
            500, f"internal server error: {type(e).__name__}", "InternalServerError"
        )
