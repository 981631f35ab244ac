"""Sampling parameters, shaped like vLLM's so that its users feel at home."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

_GREEDY_EPS = 1e-5


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None = up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None  # matched on the text and removed from it
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (plus the sampled one)
    prompt_logprobs: int | None = None  # top-k logprobs per prompt token
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Filled in by the engine: eos ids of the model, ended on unless ignore_eos.
    _eos_token_ids: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        checks = [
            (self.n >= 1, "n must be >= 1", self.n),
            # Any int64, as vLLM (UIs send -1); position_seed maps it into the generator's range.
            (
                self.seed is None or -(2**63) <= self.seed < 2**63,
                "seed must be a 64-bit integer",
                self.seed,
            ),
            (self.temperature >= 0.0, "temperature must be >= 0", self.temperature),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]", self.top_p),
            (self.top_k >= 0, "top_k must be -1 (off), 0 (off) or >= 1", self.top_k),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]", self.min_p),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                "presence_penalty must be in [-2, 2]",
                self.presence_penalty,
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                "frequency_penalty must be in [-2, 2]",
                self.frequency_penalty,
            ),
            (
                self.repetition_penalty > 0.0,
                "repetition_penalty must be > 0",
                self.repetition_penalty,
            ),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                "max_tokens must be >= 1",
                self.max_tokens,
            ),
            (self.min_tokens >= 0, "min_tokens must be >= 0", self.min_tokens),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens must be <= max_tokens",
                self.min_tokens,
            ),
            (self.logprobs is None or self.logprobs >= 0, "logprobs must be >= 0", self.logprobs),
            (
                self.prompt_logprobs is None or self.prompt_logprobs >= 0,
                "prompt_logprobs must be >= 0",
                self.prompt_logprobs,
            ),
            (
                all(isinstance(s, str) and s for s in self.stop),
                "stop strings must be non-empty strings",
                self.stop,
            ),
            (
                all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids must be non-negative ints",
                self.stop_token_ids,
            ),
        ]
        for ok, message, value in checks:
            if not ok:
                raise ValueError(f"{message}, got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_output_history(self) -> bool:
        """Penalties read every output token on the host, the last one included."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )

    @property
    def all_stop_token_ids(self) -> set[int]:
        """Token ids that end generation (EOS unless ignored, plus stop_token_ids)."""
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids.update(self._eos_token_ids)
        return ids

    def clone(self, **changes: object) -> SamplingParams:
        return replace(self, **changes)
