"""POST /v1/chat/completions: messages through the chat template, then one engine request.

The template comes from the request, else --chat-template, else the tokenizer; template kwargs are
--default-chat-template-kwargs overridden per request. response_format json_object is accepted but
the output is not constrained (there is no guided decoding).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from atom.engine.async_llm import AsyncLLM
from atom.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    OpenAIError,
    UsageInfo,
)
from atom.entrypoints.openai.serving_completion import (
    SSE_DONE,
    OpenAIServing,
    SSEResponse,
    merge,
    sse,
    stream_error,
    until_disconnect,
)
from atom.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from atom.sampling_params import SamplingParams


class OpenAIServingChat(OpenAIServing):
    def __init__(
        self,
        llm: AsyncLLM,
        model_name: str,
        max_log_len: int | None,
        chat_template: str | None,
        default_template_kwargs: dict[str, Any] | None,
        trust_request_chat_template: bool = False,
    ) -> None:
        super().__init__(llm, model_name, max_log_len)
        self.chat_template = chat_template
        self.default_template_kwargs = default_template_kwargs or {}
        self.trust_request_chat_template = trust_request_chat_template

    def render(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[str, list[int]]:
        """The prompt text and its token ids; template errors are the client's (400)."""
        tokenizer = self.llm.tokenizer
        template = chat_template or self.chat_template
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise OpenAIError("the model has no chat template: pass --chat-template")
        kwargs = {**self.default_template_kwargs, **(template_kwargs or {})}
        # Arguments of apply_chat_template itself: the request's own values win, as in vLLM.
        add_generation_prompt = bool(kwargs.pop("add_generation_prompt", add_generation_prompt))
        for reserved in ("tokenize", "chat_template", "conversation", "return_dict"):
            kwargs.pop(reserved, None)
        if tools is not None:
            kwargs["tools"] = tools
        try:
            text = tokenizer.apply_chat_template(
                [m.to_template() for m in messages],
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **kwargs,
            )
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise OpenAIError(f"could not apply the chat template: {e}", param="messages") from e
        # The template already wrote any BOS: the tokenizer must not add another.
        return text, list(tokenizer.encode(text, add_special_tokens=False))

    async def create(self, request: ChatCompletionRequest, raw: Request) -> Response:
        request_id = self.request_id("chatcmpl", raw)
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
        if request.chat_template is not None and not self.trust_request_chat_template:
            raise OpenAIError(
                "a request may bring its own chat_template only when the server runs with "
                "--trust-request-chat-template (a template is code run on the server)",
                param="chat_template",
            )
        text, ids = await self.off_loop(
            self.render,
            request.messages,
            request.add_generation_prompt,
            request.chat_template,
            request.chat_template_kwargs,
            request.tools,
        )
        param = (
            "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        )
        max_tokens = self.max_tokens(request.requested_max_tokens, len(ids), param)
        if max_tokens == 0:
            raise OpenAIError(f"{param} must be >= 1", param=param)
        params = SamplingParams(
            **(self.sampling_defaults | request.sampling_kwargs()),
            max_tokens=max_tokens,
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        )
        prompt = {"prompt": text, "prompt_token_ids": ids}
        self.validate(prompt, params)
        self.log_request(request_id, text, params)
        gen = self.llm.generate(prompt, params, self.engine_id(request_id, 0))
        view = _ChatView(self, request, request_id)
        if request.stream:
            return SSEResponse(view.stream(merge([gen])))
        final = await until_disconnect(view.collect(merge([gen])), raw)
        return JSONResponse(view.response(final))


class _ChatView:
    """Engine outputs of one chat request as OpenAI chat.completion(.chunk) JSON."""

    def __init__(
        self, serving: OpenAIServingChat, request: ChatCompletionRequest, rid: str
    ) -> None:
        self.s, self.req, self.id = serving, request, rid
        self.created = int(time.time())

    async def collect(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> RequestOutput:
        final = None
        async for _, out in outputs:
            final = out
        assert final is not None
        return final

    def response(self, out: RequestOutput) -> dict[str, Any]:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(c.token_ids, c.logprobs),
                "finish_reason": _finish(c),
                "stop_reason": c.stop_reason,
            }
            for c in out.outputs
        ]
        return self._body("chat.completion", choices, usage=_usage(out).model_dump())

    async def stream(self, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        sent: dict[int, int] = {}  # choice -> tokens already streamed
        final = None
        try:
            async for _, out in outputs:
                final = out
                for c in out.outputs:
                    if c.index not in sent:  # the role goes first, on its own
                        sent[c.index] = 0
                        delta = {"role": "assistant", "content": ""}
                        yield sse(self._chunk(c.index, delta, None, None))
                    start = sent[c.index]
                    new_ids = c.token_ids[start:]
                    if not (new_ids or c.delta_text or c.finish_reason):
                        continue
                    sent[c.index] = len(c.token_ids)
                    positions = c.logprobs[start:] if c.logprobs is not None else None
                    logprobs = self._logprobs(new_ids, positions)
                    delta = {"content": c.delta_text} if c.delta_text else {}
                    yield sse(self._chunk(c.index, delta, logprobs, c))
            if self.req.include_usage and final is not None:
                yield sse(self._body("chat.completion.chunk", [], usage=_usage(final).model_dump()))
        except Exception as e:
            yield stream_error(e)
        yield SSE_DONE

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any],
        logprobs: dict[str, Any] | None,
        c: CompletionOutput | None,
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": _finish(c) if c is not None else None,
        }
        if c is not None and c.finish_reason is not None:
            choice["stop_reason"] = c.stop_reason
        return self._body("chat.completion.chunk", [choice])

    def _body(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.s.model_name,
            "choices": choices,
            **extra,
        }

    def _logprobs(
        self, token_ids: list[int], positions: list[PositionLogprobs] | None
    ) -> dict[str, Any] | None:
        if not self.req.logprobs or positions is None:
            return None
        num_top = self.req.top_logprobs or 0
        content = []
        for token_id, position in zip(token_ids, positions, strict=True):
            entry = position.get(token_id)
            top = sorted(
                (lp.rank, tid, lp)
                for tid, lp in position.items()
                if lp.rank is not None and lp.rank <= num_top
            )
            content.append(
                {
                    **self._token(token_id, entry.logprob if entry else float("-inf"), entry),
                    "top_logprobs": [self._token(tid, lp.logprob, lp) for _, tid, lp in top],
                }
            )
        return {"content": content}

    def _token(self, token_id: int, logprob: float, entry: Any) -> dict[str, Any]:
        token = entry.decoded_token if entry is not None and entry.decoded_token else None
        token = token if token is not None else self.s.decode_token(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _finish(c: CompletionOutput) -> str | None:
    return c.finish_reason


def _usage(out: RequestOutput) -> UsageInfo:
    gen = sum(len(c.token_ids) for c in out.outputs)
    return UsageInfo.of(len(out.prompt_token_ids), gen, out.num_cached_tokens)
