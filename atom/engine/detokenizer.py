"""Incremental detokenization and stop-string matching for one completion.

Text is produced from a sliding window of token ids: decode(prefix..end) minus decode(prefix..read)
is the new text, held back while it ends in U+FFFD (a multi-byte character split across tokens).
The window starts on the last prompt tokens so that the first output token gets its leading space.
"""

from __future__ import annotations

from typing import Any

from atom.sampling_params import SamplingParams

_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.output_text = ""
        self._emitted = 0  # characters of output_text already streamed
        stops = params.stop or []
        self._holdback = (
            0 if params.include_stop_str_in_output else max(map(len, stops), default=1) - 1
        )

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def update(
        self, new_token_ids: list[int], num_output_tokens: int, stopped_on_token: bool = False
    ) -> str | None:
        """Add tokens; returns the stop string that ended the text, if one did.

        A final EOS / stop token id (`stopped_on_token`) adds no text unless
        include_stop_str_in_output asks for it, as in vLLM.
        """
        # num_output_tokens counts all of new_token_ids; min_tokens is judged token by token.
        first_count = num_output_tokens - len(new_token_ids) + 1
        if stopped_on_token and not self.params.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]
        for count, token_id in enumerate(new_token_ids, start=first_count):
            self._ids.append(token_id)
            prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
            text = self._decode(self._ids[self._prefix_offset :])
            if len(text) > len(prefix) and not text.endswith("\ufffd"):
                delta = text[len(prefix) :]
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
                self.output_text += delta
                if count > self.params.min_tokens:  # as vLLM: only after min_tokens tokens
                    stop = self._check_stop_strings(len(delta))
                    if stop is not None:
                        return stop
        return None

    def _check_stop_strings(self, new_chars: int) -> str | None:
        # The match that completes first wins, as if the text had come one character at a time;
        # list order would let a later stop string cut the text after an earlier one.
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.params.stop or []:
            # Only a match that overlaps the new text can be new.
            start = max(0, len(self.output_text) - new_chars - len(stop) + 1)
            idx = self.output_text.find(stop, start)
            if idx != -1 and (best is None or idx + len(stop) < best[0]):
                best = (idx + len(stop), idx, stop)
        if best is None:
            return None
        end, idx, stop = best
        keep = end if self.params.include_stop_str_in_output else idx
        self.output_text = self.output_text[:keep]
        return stop

    def new_text(self, finished: bool) -> str:
        """Text not streamed yet, keeping back what could still become a stop string."""
        end = len(self.output_text) if finished else len(self.output_text) - self._holdback
        if end <= self._emitted:
            return ""
        delta = self.output_text[self._emitted : end]
        self._emitted = end
        return delta
