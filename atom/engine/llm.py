"""LLM: offline generation, shaped like vLLM's `LLM` (generate, chat, RequestOutput)."""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from atom.args import EngineArgs
from atom.engine.core import EngineCore
from atom.engine.gc_defer import defer_full_collections, restore_full_collections
from atom.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from atom.engine.output_processor import OutputProcessor
from atom.model_source import load_tokenizer
from atom.outputs import RequestOutput
from atom.process_age import seconds_since_process_start
from atom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Message = dict[str, Any]
# Deferred token ids whose text generate() decodes in one piece of host work (with the piece
# before as context: ~45 us on an H200 host's CPU), at most this much past the end of the step it
# hides behind.
DECODE_PIECE = 64


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        **kwargs: Any,
    ) -> None:
        args = EngineArgs(
            model=model,
            tokenizer=tokenizer,
            skip_tokenizer_init=skip_tokenizer_init,
            trust_remote_code=trust_remote_code,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            **kwargs,
        )
        start = time.perf_counter()
        self.config = args.create_engine_config()
        mc = self.config.model
        configured = time.perf_counter()
        self.tokenizer: Any = None
        if not skip_tokenizer_init:
            gguf = mc.gguf_file if mc.tokenizer == mc.model_dir else None
            self.tokenizer = load_tokenizer(mc.tokenizer, gguf, trust_remote_code)
        tokenized = time.perf_counter()
        self.engine = EngineCore(self.config)
        ready, since_start = time.perf_counter(), seconds_since_process_start()
        logger.info(
            "LLM ready in %.1f s (config %.1f s, tokenizer %.1f s, engine %.1f s)%s",
            ready - start,
            configured - start,
            tokenized - configured,
            ready - tokenized,
            "" if since_start is None else f"; {since_start:.1f} s since the process started",
        )
        self.inputs = InputProcessor(self.config.model, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        # Worker processes of tensor parallelism end with the LLM object, or at exit.
        self._finalizer = weakref.finalize(self, self.engine.shutdown)

    def shutdown(self) -> None:
        self._finalizer()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def start_profile(self) -> None:
        """Start the torch profiler on every rank (needs torch_profiler_dir)."""
        self.engine.start_profile()

    def stop_profile(self) -> None:
        """Stop it; traces go to <torch_profiler_dir>/rank_<r>/."""
        self.engine.stop_profile()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (as vLLM's LLM.reset_prefix_cache); False, and
        nothing reset, while a request still holds blocks."""
        return self.engine.reset_prefix_cache()

    # ---- public API ----
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        items = [prompts] if isinstance(prompts, str | dict) else list(prompts)
        params = self._broadcast_params(sampling_params, len(items))
        # Validate everything before adding anything: a bad prompt leaves the engine untouched.
        processed = [self.inputs.process(p, sp) for p, sp in zip(items, params, strict=True)]
        request_ids = [self._add_request(p) for p in processed]
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer (skip_tokenizer_init=True was given)")
        if not messages:
            raise ValueError("messages is empty")
        conversations = messages if isinstance(messages[0], list) else [messages]
        prompts = [
            self.apply_chat_template(c, chat_template, add_generation_prompt, chat_template_kwargs)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(
        self,
        conversation: list[Message],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        kwargs = dict(
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            **(chat_template_kwargs or {}),
        )
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
        ids = self.tokenizer.apply_chat_template(
            conversation, tokenize=True, return_dict=False, **kwargs
        )
        return {"prompt": text, "prompt_token_ids": list(ids)}

    # ---- internals ----
    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (as vLLM's)."""
        return SamplingParams(**dict(self.config.model.sampling_defaults))

    def _broadcast_params(
        self, params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if params is None:
            return [self.get_default_sampling_params() for _ in range(n)]
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts")
        return list(params)

    def _add_request(self, prompt: ProcessedPrompt) -> str:
        request_id = str(next(self._ids))
        arrival = time.time()
        self.output_processor.add_request(
            request_id, prompt.text, prompt.token_ids, prompt.params, arrival, streamed=False
        )
        for request in self.inputs.core_requests(request_id, prompt, arrival):
            self.engine.add_request(request)
        return request_id

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        start, tokens_in, tokens_out = time.perf_counter(), 0, 0

        def collect_finished(
            busy: Callable[[], bool] = lambda: False, piece: int | None = DECODE_PIECE
        ) -> None:
            """Build the outputs of finished requests, decoding their text `piece` ids at a
            time: one piece, then more while the device still runs the step the engine waits
            for. At batch 1 a step is ~1.1 ms of the device and its host work ~0.8 ms, so even
            one output of 1,000 tokens (~0.35 ms) built at once left the GPU idle (RESULTS.md,
            eighteenth and twentieth sittings). piece None: everything left, in one go."""
            nonlocal tokens_in, tokens_out
            while self.output_processor.num_finished:
                for out in self.output_processor.take_finished(piece):
                    done[out.request_id] = out
                    tokens_in += len(out.prompt_token_ids)
                    tokens_out += sum(len(c.token_ids) for c in out.outputs)
                    elapsed = time.perf_counter() - start
                    rates = f"input {tokens_in / elapsed:.1f}, output {tokens_out / elapsed:.1f}"
                    bar.set_postfix_str(f"{rates} tok/s", refresh=False)
                    bar.update(1)
                if not busy():
                    return

        defer_full_collections()  # while the requests run (gc_defer.py)
        try:
            while self.engine.has_work():  # a step in flight is collected too
                _, to_finish = self.output_processor.process(
                    self.engine.step(collect_finished), final_only=True, defer=True
                )
                if to_finish:
                    self.engine.finish_requests(to_finish)
            collect_finished(piece=None)  # all that is left: no step to hide behind
        except BaseException:
            self.output_processor.drop_finished()
            for request_id in request_ids:  # leave the engine clean for the next call
                self.engine.abort_requests(self.output_processor.abort(request_id))
            raise
        finally:
            restore_full_collections()
            bar.close()
        return [done[r] for r in request_ids]
