"""Incremental detokenization and stop-string matching for one completion.

Text is produced from a sliding window of token ids: decode(prefix..end) minus decode(prefix..read)
is the new text, held back while it ends in U+FFFD (a multi-byte character split across tokens).
The window starts on the last prompt tokens so that the first output token gets its leading space.

A fast (Rust `tokenizers`) tokenizer runs the same window in Rust with `DecodeStream`: one Rust
decode a token instead of two through transformers (SmolLM2's tokenizer on a 2-core CPU: 6.6 ->
1.5 us a token). Its text is the same: it emits exactly when the window's text extends the previous
one; where it would not (a decoder that rewrites earlier text) it raises, and this completion goes
on with the Python window, whose offsets are kept in step. Everything else (slow tokenizers, an old
`tokenizers`, a prompt that ends inside a character) takes the Python window from the start.

A completion nobody reads before it ends (LLM.generate) and without stop strings is deferred: its
ids are collected and decoded in one window when the text is first read, or before that in pieces
(`decode_deferred`: LLM.generate decodes a finished completion's text while the GPU runs a step,
a piece at a time). On a GPU a step's host work overlaps the next step's kernels, and a decode per
token per step (0.3-0.5 ms a step at batch 256) was a part of that host work large enough to leave
the GPU waiting. The text is the same for valid text, a final unfinished character included; on
invalid byte sequences that a byte-fallback decoder rewrites, one decode gives that decoder's own
text for the whole window, so there LLM.generate's replacement characters can differ from a
streamed completion's.
"""

from __future__ import annotations

import logging
from typing import Any

from atom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_PROMPT_CONTEXT = 5


def fast_backend(tokenizer: Any) -> Any | None:
    """The Rust `tokenizers.Tokenizer` behind `tokenizer` when its `decode` is exactly the Rust
    decode, else None. transformers' fast `_decode` ignores spaces_between_special_tokens and we
    pass clean_up_tokenization_spaces=False, so only skip_special_tokens reaches Rust."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return None
    cls = type(tokenizer)
    if not (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is PreTrainedTokenizerFast._decode
    ):
        return None  # a subclass that post-processes decoded text
    return getattr(tokenizer, "backend_tokenizer", None)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        params: SamplingParams,
        use_decode_stream: bool = True,
        deferred: bool = False,
    ) -> None:
        """deferred: nobody reads the text before the end (LLM.generate) and no stop string
        needs it: ids are only collected, and the text is decoded once, when first read."""
        self.tokenizer = tokenizer
        self.params = params
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""
        self._emitted = 0  # characters of output_text already streamed
        self._stops = params.stop or []
        self._deferred = deferred and not self._stops
        self._pending: list[int] = []  # ids a deferred detokenizer has not decoded yet
        self._holdback = (
            0 if params.include_stop_str_in_output else max(map(len, self._stops), default=1) - 1
        )
        self._backend: Any | None = None
        self._stream: Any | None = None  # a DecodeStream over the same window as self._ids
        self._use_decode_stream = use_decode_stream
        if use_decode_stream:
            self._open_stream()

    def _open_stream(self) -> None:
        backend = fast_backend(self.tokenizer)
        if backend is None:
            return
        skip = self.params.skip_special_tokens
        # A prompt ending inside a character leaves DecodeStream no prefix to trim: use the window.
        if self._ids and backend.decode(self._ids, skip_special_tokens=skip).endswith("\ufffd"):
            return
        try:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(self._ids, skip_special_tokens=skip)
        except (ImportError, TypeError):  # no DecodeStream, or one that cannot be primed
            return
        self._backend = backend

    @property
    def uses_decode_stream(self) -> bool:
        return self._stream is not None

    @property
    def output_text(self) -> str:
        self.decode_deferred()
        return self._text

    @property
    def num_deferred(self) -> int:
        """Ids a deferred detokenizer holds whose text is not decoded yet."""
        return len(self._pending)

    def decode_deferred(self, limit: int | None = None) -> int:
        """Decodes up to `limit` of the deferred ids (None: all) in one decode of the window;
        returns how many it took. Piece by piece the text is what the token-by-token updates add
        up to, as it is in one piece: a piece that ends inside a character stays in the window
        for the next, and when the last one does, it goes token by token after all, which keeps
        back the unfinished character exactly as they do. A piece's window starts where the one
        before ended cleanly (a byte-fallback decoder turns a run of byte tokens cut at its start
        into replacement characters), so it costs a decode of both pieces."""
        take = len(self._pending) if limit is None else min(max(limit, 0), len(self._pending))
        if take == 0:
            return 0
        piece, self._pending = self._pending[:take], self._pending[take:]
        self._ids.extend(piece)
        self._stream = None  # it has not seen these ids: the Python window goes on from here
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if text.startswith(prefix) and not text.endswith("\ufffd"):
            if len(text) > len(prefix):  # else (special tokens skipped, say) nothing to add
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
                self._text += text[len(prefix) :]
            return take
        if text.startswith(prefix) and self._pending:
            return take  # inside a character: the next piece may complete it
        # Token by token from the window as it was: a stream primed with it where one can be.
        rest = self._ids[self._read_offset :] + self._pending
        self._pending = []
        self._ids = self._ids[self._prefix_offset : self._read_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        self._deferred = False
        if self._use_decode_stream:
            self._open_stream()
        self.update(rest, len(rest))
        return take

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:  # the same text without transformers' per-id checks
            return self._backend.decode(ids, skip_special_tokens=self.params.skip_special_tokens)
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _window_text(self) -> str | None:
        """New text of the Python window, which already holds the latest id."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            return text[len(prefix) :]
        return None

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
        if self._deferred:
            self._pending += new_token_ids
            return None
        ids, stream, backend = self._ids, self._stream, self._backend
        for count, token_id in enumerate(new_token_ids, start=first_count):
            ids.append(token_id)
            if stream is not None:
                try:
                    delta = stream.step(backend, token_id)
                except Exception as e:  # the text does not extend its prefix: see module doc
                    logger.debug("DecodeStream gave up (%s); decoding the window in Python", e)
                    self._stream = stream = None
                    delta = self._window_text()
            else:
                delta = self._window_text()
            if delta is None:
                continue
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)
            self._text += delta
            if self._stops and count > self.params.min_tokens:  # as vLLM: after min_tokens
                stop = self._check_stop_strings(len(delta))
                if stop is not None:
                    return stop
        return None

    def _check_stop_strings(self, new_chars: int) -> str | None:
        # The match that completes first wins, as if the text had come one character at a time;
        # list order would let a later stop string cut the text after an earlier one.
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            # Only a match that overlaps the new text can be new.
            start = max(0, len(self._text) - new_chars - len(stop) + 1)
            idx = self._text.find(stop, start)
            if idx != -1 and (best is None or idx + len(stop) < best[0]):
                best = (idx + len(stop), idx, stop)
        if best is None:
            return None
        end, idx, stop = best
        keep = end if self.params.include_stop_str_in_output else idx
        self._text = self._text[:keep]
        return stop

    def new_text(self, finished: bool) -> str:
        """Text not streamed yet, keeping back what could still become a stop string."""
        end = len(self.output_text) if finished else len(self.output_text) - self._holdback
        if end <= self._emitted:
            return ""
        delta = self.output_text[self._emitted : end]
        self._emitted = end
        return delta
