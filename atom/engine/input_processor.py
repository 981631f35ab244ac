"""Front-end input checks: a prompt and its sampling params become validated token ids.

Everything a request could fail on is checked here, before anything reaches the engine core, so
that a bad request raises ValueError and leaves the engine untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from atom.config import ModelConfig
from atom.engine.output_processor import child_request_id
from atom.engine.request import Request
from atom.sampling_params import SamplingParams

PromptType = str | dict[str, Any]  # "text" or {"prompt_token_ids": [...]} / {"prompt": "text"}


@dataclass(frozen=True, slots=True)
class ProcessedPrompt:
    text: str | None
    token_ids: list[int]
    params: SamplingParams  # validated, with the model's EOS ids filled in


class InputProcessor:
    def __init__(self, config: ModelConfig, tokenizer: Any | None) -> None:
        self.config = config
        self.tokenizer = tokenizer

    def process(self, prompt: PromptType, params: SamplingParams) -> ProcessedPrompt:
        text, ids = self._tokenize(prompt)
        self._check_ids(ids)
        return ProcessedPrompt(text, ids, self._check_params(params))

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, dict):
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        else:
            raise ValueError(f"a prompt must be a str or a dict, got {type(prompt).__name__}")
        if ids is None:
            if text is None:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True)")
            ids = self.tokenizer.encode(text)
        return text, list(ids)

    def _check_ids(self, ids: list[int]) -> None:
        vocab, max_len = self.config.vocab_size, self.config.max_model_len
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) > max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than max_model_len={max_len}")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")

    def _check_params(self, params: SamplingParams) -> SamplingParams:
        params = params.clone(_eos_token_ids=self.config.eos_token_ids)  # also re-validates
        vocab, max_logprobs = self.config.vocab_size, self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > max_logprobs:
                raise ValueError(f"{name}={value} is more than max_logprobs={max_logprobs}")
        bad = [t for t in params.stop_token_ids or [] if t >= vocab]
        if bad:
            raise ValueError(f"stop token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (skip_tokenizer_init=True was given)")
        return params

    @staticmethod
    def core_requests(request_id: str, prompt: ProcessedPrompt, arrival: float) -> list[Request]:
        """The engine-core requests of one prompt: n children sharing its prompt blocks.

        Child i samples with seed + i; only child 0 computes prompt logprobs (the others may then
        hit the prefix cache).
        """
        params = prompt.params
        if params.n == 1:
            return [Request(request_id, prompt.token_ids, params, arrival)]
        children = []
        for i in range(params.n):
            child = params.clone(
                n=1,
                seed=None if params.seed is None else params.seed + i,
                prompt_logprobs=params.prompt_logprobs if i == 0 else None,
            )
            child_id = child_request_id(request_id, i, params.n)
            children.append(Request(child_id, prompt.token_ids, child, arrival))
        return children
