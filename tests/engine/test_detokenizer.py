"""IncrementalDetokenizer on a byte-level BPE tokenizer trained in the test: multi-byte characters
split across tokens, stop strings across token boundaries, min_tokens and streaming hold-back."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from atom.engine.detokenizer import IncrementalDetokenizer
from atom.sampling_params import SamplingParams

CORPUS = [
    "héllo wörld 你好 🙂",
    "hello world, hello there",
    "the quick brown fox jumps over the lazy dog",
    "stop here. STOP! the end",
]
# Pieces of random texts. The characters the tokenizer never saw (ß € 😀 ñ) become several
# single-byte tokens: split multi-byte characters.
PIECES = [
    "hello",
    " world",
    " the",
    "é",
    "ö",
    "你",
    "好",
    " 🙂",
    "😀",
    "ß",
    "€",
    "ñ",
    " ",
    "a",
    "!",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert decode(tokenizer, ids) == text
    return ids


def decode(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def random_text(rng: random.Random, pieces: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(pieces))


def run(
    tokenizer: PreTrainedTokenizerFast,
    prompt: list[int],
    output: list[int],
    params: SamplingParams,
    chunks: list[int] | None = None,
) -> tuple[IncrementalDetokenizer, str | None, list[str], int]:
    """Feed output ids in chunks (default one by one), streaming new_text(finished=False) after
    each; returns the detokenizer, the stop string, the streamed deltas and the tokens fed."""
    detok = IncrementalDetokenizer(tokenizer, prompt, params)
    deltas: list[str] = []
    fed, stop = 0, None
    for size in chunks or [1] * len(output):
        new = output[fed : fed + size]
        fed += len(new)
        stop = detok.update(new, fed)
        assert "\ufffd" not in detok.output_text  # split characters are held back
        deltas.append(detok.new_text(finished=stop is not None))
        if stop is not None:
            break
    deltas.append(detok.new_text(finished=True))
    return detok, stop, deltas, fed


def test_tokenizer_splits_multibyte_characters(tokenizer: PreTrainedTokenizerFast) -> None:
    for char in ["😀", "ß", "€", "ñ"]:
        ids = encode(tokenizer, char)
        assert len(ids) > 1 and "\ufffd" in decode(tokenizer, ids[:1])


@pytest.mark.parametrize("seed", range(12))
def test_incremental_text_equals_full_decode(tokenizer: PreTrainedTokenizerFast, seed: int) -> None:
    rng = random.Random(seed)
    prompt = encode(tokenizer, random_text(rng, rng.randint(1, 8)))
    text = random_text(rng, rng.randint(1, 30))
    output = encode(tokenizer, text)
    chunks = None
    if seed % 2:  # several tokens per update, as after a multi-token step
        chunks = []
        while sum(chunks) < len(output):
            chunks.append(rng.randint(1, 4))
    detok, stop, deltas, _ = run(tokenizer, prompt, output, SamplingParams(), chunks)
    assert stop is None
    assert detok.output_text == decode(tokenizer, output) == text
    assert "".join(deltas) == text


def test_split_characters_and_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    prompt = encode(tokenizer, "€")  # the prompt window starts inside a character
    output = [*encode(tokenizer, "ß😀 hello€"), eos]
    detok, _, deltas, _ = run(tokenizer, prompt[1:], output, SamplingParams())
    assert detok.output_text == "ß😀 hello€" == "".join(deltas)


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("seed", range(10))
def test_stop_string_cuts_text_exactly(
    tokenizer: PreTrainedTokenizerFast, seed: int, include: bool
) -> None:
    rng = random.Random(100 + seed)
    text = random_text(rng, 25)
    output = encode(tokenizer, text)
    start = rng.randrange(len(text) - 1)
    stop = text[start : start + rng.randint(1, 4)]
    params = SamplingParams(stop=[stop], include_stop_str_in_output=include)
    detok, found, deltas, _ = run(tokenizer, [], output, params)
    cut = text.index(stop)
    assert found == stop
    assert detok.output_text == text[: cut + len(stop) if include else cut]
    assert "".join(deltas) == detok.output_text


def test_stop_string_across_token_boundary(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "hello world the end"
    output = encode(tokenizer, text)
    pieces = [decode(tokenizer, [i]) for i in output]
    assert not any("o w" in p for p in pieces)  # only the sequence holds it
    for include, expected in [(False, "hell"), (True, "hello w")]:
        params = SamplingParams(stop=["o w"], include_stop_str_in_output=include)
        detok, found, _, fed = run(tokenizer, [], output, params)
        assert found == "o w" and detok.output_text == expected
        assert fed == 2  # found on the token that completes it


def test_earliest_stop_string_wins(tokenizer: PreTrainedTokenizerFast) -> None:
    output = encode(tokenizer, "hello world")
    assert decode(tokenizer, output[:1]) == "hello"  # one token holds both stop strings
    detok, found, _, _ = run(tokenizer, [], output, SamplingParams(stop=["llo", "he"]))
    assert found == "he" and detok.output_text == ""
    params = SamplingParams(stop=["world", "ell"], include_stop_str_in_output=True)
    detok, found, _, _ = run(tokenizer, [], output, params)
    assert found == "ell" and detok.output_text == "hell"


def test_min_tokens_defers_stop_strings(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "hello world hello world"
    output = encode(tokenizer, text)
    first = [decode(tokenizer, output[:n]) for n in range(len(output) + 1)]
    params = SamplingParams(stop=["wor"], min_tokens=3)
    expected = "hello world hello "
    assert first[2] == "hello world" and len(output) > 3
    # One token per update, and all tokens in one update: the count is per token either way.
    for chunks in (None, [len(output)]):
        detok, found, _, _ = run(tokenizer, [], output, params, chunks)
        assert found == "wor" and detok.output_text == expected
    # "wor" completes on token 2: stop strings count only after min_tokens tokens (as vLLM).
    detok, found, _, _ = run(tokenizer, [], output, params.clone(min_tokens=2))
    assert found == "wor" and detok.output_text == expected
    detok, found, _, _ = run(tokenizer, [], output, params.clone(min_tokens=1))
    assert found == "wor" and detok.output_text == "hello "


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_streaming_holds_back_and_concatenates(
    tokenizer: PreTrainedTokenizerFast, seed: int, include: bool
) -> None:
    rng = random.Random(200 + seed)
    text = random_text(rng, 30)
    output = encode(tokenizer, text)
    stops = ["zzzz", text[-3:] if seed % 2 else "q"]  # the longest stop string sets the hold-back
    holdback = 0 if include else 3
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    streamed, found = "", None
    for n, token_id in enumerate(output, start=1):
        found = detok.update([token_id], n)
        if found is not None:
            break
        streamed += detok.new_text(finished=False)
        assert streamed == detok.output_text[: max(0, len(detok.output_text) - holdback)]
    streamed += detok.new_text(finished=True)
    assert streamed == detok.output_text
    assert detok.new_text(finished=True) == ""
    cut = min(text.find(s) for s in stops if s in text) if found else len(text)
    end = cut + len(found) if found and include else cut
    assert detok.output_text == text[:end]


def test_no_stop_strings_no_holdback(tokenizer: PreTrainedTokenizerFast) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    output = encode(tokenizer, "hello world")
    detok.update(output[:1], 1)
    assert detok.new_text(finished=False) == "hello"
    detok.update(output[1:], len(output))
    assert detok.new_text(finished=False) == " world"
    assert detok.new_text(finished=True) == ""


def test_first_token_keeps_its_leading_space() -> None:
    """SentencePiece-style decoders drop the space of a sequence's first word: the prompt tail
    gives the first output token its context."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=80))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    prompt = encode(tokenizer, "hello")
    output = tokenizer.encode(" world the end", add_special_tokens=False)
    assert decode(tokenizer, output) == "world the end"  # alone, the space is lost
    detok, _, deltas, _ = run(tokenizer, prompt, output, SamplingParams())
    assert detok.output_text == " world the end" == "".join(deltas)
