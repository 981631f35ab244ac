"""Requests are prepared in TOKENIZER_THREADS threads that share one fast tokenizer: its encodes
only read it, so concurrent ones (beside the event loop's incremental decodes) give the ids one
thread gives."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from atom.engine.detokenizer import IncrementalDetokenizer
from atom.entrypoints.openai.serving_completion import TOKENIZER_THREADS
from atom.sampling_params import SamplingParams


def test_concurrent_encodes_match_one_thread() -> None:
    assert TOKENIZER_THREADS >= 1
    vocab = {f"t{i}": i for i in range(5000)} | {"<eos>": 5000}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    rng = random.Random(0)
    texts = [
        " ".join(f"t{rng.randrange(5000)}" for _ in range(rng.randrange(50, 900)))
        for _ in range(96)
    ]
    alone = [tokenizer.encode(t) for t in texts]
    detok = IncrementalDetokenizer(tokenizer, alone[0], SamplingParams())
    with ThreadPoolExecutor(max(TOKENIZER_THREADS, 4)) as pool:
        futures = [pool.submit(tokenizer.encode, t) for t in texts]
        for i, token_id in enumerate(alone[1][:400]):  # the loop's decodes meanwhile
            detok.update([token_id], i + 1)
        together = [f.result() for f in futures]
    assert together == alone
    assert detok.output_text == " " + texts[1][: len(detok.output_text) - 1]
