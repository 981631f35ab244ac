"""The fast path on CUDA: graphs and compile levels change no token; fp8 KV against bf16 KV."""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from atom import LLM, SamplingParams, custom_all_reduce, distributed
from atom.executor.cuda_graphs import DecodeGraphs
from atom.executor.mixed_graphs import MixedGraphs
from atom.executor.model_runner import ModelRunner
from atom.kernels.attention_config import SHORT_CONTEXT, short_decode_tiles
from tests.gpu.conftest import SMALL_ENGINE, unwarmed_sizes_change_no_token

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        vocab_size=1000,
        max_position_embeddings=2048,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("qwen3")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _prompts(n: int = 11) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(2)
    lens = [1, 15, 16, 17, 100, 333, 2, 40, 64, 5, 700][:n]
    return [
        {"prompt_token_ids": torch.randint(3, 1000, (k,), generator=gen).tolist()} for k in lens
    ]


def _tokens(path: Path, **kwargs: Any) -> list[list[int]]:
    llm = LLM(str(path), skip_tokenizer_init=True, device="cuda", **{**SMALL_ENGINE, **kwargs})
    outs = llm.generate(_prompts(), GREEDY, use_tqdm=False)
    pool = llm.engine.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
    return [o.outputs[0].token_ids for o in outs]


def test_cuda_graphs_change_no_token(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    eager = _tokens(checkpoint, dtype="float32", enforce_eager=True)
    short_graph: set[bool] = set()  # whether a replay took a size's short-context graph
    replay = DecodeGraphs.replay

    def spy(self: DecodeGraphs, size: int, max_seq_len: int) -> torch.Tensor:
        caps = self._caps[size]
        short_graph.add(len(caps) > 1 and max_seq_len <= caps[0] == SHORT_CONTEXT)
        return replay(self, size, max_seq_len)

    monkeypatch.setattr(DecodeGraphs, "replay", spy)
    # sizes 1, 2, 4, 8, 16: the 11 sequences decode through padded graphs as they finish
    graphs = _tokens(checkpoint, dtype="float32", level=0, cudagraph_capture_sizes=[1, 2, 4, 8, 16])
    assert graphs == eager
    # Steps of short contexts (their graph) and of long ones both ran in graphs.
    assert short_graph == {True, False}


def test_short_context_tiles_change_no_token(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose programs cover every SM twice replays its size's graph for short contexts,
    in 64-token tiles of one stage (attention_config.short_decode_tiles): tokens as eager."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    size = 16 * -(-sms // 16)  # 2 KV heads: 2 x size programs >= 2 x SMs
    assert short_decode_tiles(2 * size, sms) == (64, 1)
    gen = torch.Generator().manual_seed(3)
    prompts = [
        {"prompt_token_ids": torch.randint(3, 1000, (int(k),), generator=gen).tolist()}
        for k in torch.randint(1, 200, (size,), generator=gen)
    ]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine = {"max_num_seqs": size, "kv_cache_memory_bytes": 1 << 30, "dtype": "float32"}

    def tokens(**kwargs: Any) -> list[list[int]]:
        llm = LLM(str(checkpoint), skip_tokenizer_init=True, device="cuda", **engine, **kwargs)
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            llm.shutdown()
        return [o.outputs[0].token_ids for o in outs]

    replayed: list[tuple[int, int]] = []
    replay = DecodeGraphs.replay

    def spy(self: DecodeGraphs, rows: int, max_seq_len: int) -> torch.Tensor:
        caps = self._caps[rows]
        replayed.append((rows, caps[min(bisect.bisect_left(caps, max_seq_len), len(caps) - 1)]))
        return replay(self, rows, max_seq_len)

    eager = tokens(enforce_eager=True)
    monkeypatch.setattr(DecodeGraphs, "replay", spy)
    assert tokens(level=0, cudagraph_capture_sizes=[size]) == eager
    assert (size, SHORT_CONTEXT) in replayed


def test_graph_sampling_matches_eager(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded random draws: the plain draw's graph and the eager sampler give the same tokens,
    as does the eager sampler that steps with logprobs rows run after a graph replay."""
    plain = [
        SamplingParams(temperature=0.8, seed=i, max_tokens=24, ignore_eos=True) for i in range(6)
    ]
    logprobs = [  # every row: no step of this run may draw through the plain graph
        SamplingParams(temperature=0.8, seed=i, max_tokens=24, ignore_eos=True, logprobs=2)
        for i in range(6)
    ]

    def run(params: list[SamplingParams], **kwargs: Any) -> list[list[int]]:
        llm = LLM(
            str(checkpoint),
            skip_tokenizer_init=True,
            device="cuda",
            dtype="float32",
            **{**SMALL_ENGINE, **kwargs},
        )
        replays.clear()  # not the start-up warm-up requests' draws
        try:
            outs = llm.generate(_prompts(6), params, use_tqdm=False)
        finally:
            llm.shutdown()
        return [o.outputs[0].token_ids for o in outs]

    replays: list[int] = []
    replay_sample = DecodeGraphs.replay_sample

    def spy(self: DecodeGraphs, size: int) -> torch.Tensor:
        replays.append(size)
        return replay_sample(self, size)

    monkeypatch.setattr(DecodeGraphs, "replay_sample", spy)
    eager = run(plain, enforce_eager=True)
    assert run(plain, level=0) == eager
    assert replays, "no step drew through the sampler's graph"
    assert run(logprobs, level=0) == eager  # the eager sampler after a replay: the same draws
    assert not replays, "a step with a logprobs row took the plain draw's graph"


@pytest.mark.parametrize("level", [0, 3])
def test_mixed_step_graphs_change_no_token(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, level: int
) -> None:
    """Steps that are not decode-only replay a mixed graph padded to the next size (here those
    of up to 256 tokens; the 512-token chunks run ungraphed in the same run, and the last
    prompt's step, of 269 tokens and some decode rows, ungraphed padded to a multiple of 16:
    executor/eager_steps.py): tokens as eager.
    Without mixed graphs every such step runs ungraphed, padded to its eager size."""
    chunked = {"dtype": "float32", "max_num_batched_tokens": 512}
    eager = _tokens(checkpoint, enforce_eager=True, **chunked)
    replayed: list[int] = []
    ungraphed: list[int] = []  # token counts of mixed steps too large for every graph
    padded: list[tuple[int, int | None]] = []  # (token count, its eager size)
    replay, padded_size = MixedGraphs.replay, MixedGraphs.padded_size
    pad_eager = ModelRunner._pad_eager

    def eager_spy(self: ModelRunner, num_tokens: int) -> int | None:
        padded.append((num_tokens, pad_eager(self, num_tokens)))
        return padded[-1][1]

    def spy(self: MixedGraphs, size: int) -> torch.Tensor:
        replayed.append(size)
        return replay(self, size)

    def size_spy(self: MixedGraphs, num_tokens: int) -> int | None:
        size = padded_size(self, num_tokens)
        if size is None:
            ungraphed.append(num_tokens)
        return size

    monkeypatch.setattr(MixedGraphs, "replay", spy)
    monkeypatch.setattr(MixedGraphs, "padded_size", size_spy)
    monkeypatch.setattr(ModelRunner, "_pad_eager", eager_spy)
    mixed = _tokens(checkpoint, level=level, mixed_graph_max_tokens=256, **chunked)
    assert mixed == eager
    assert replayed and set(replayed) <= {16, 32, 64, 128, 256}, replayed
    assert 512 in ungraphed, ungraphed  # the full chunks ran ungraphed beside them
    assert (512, 512) in padded and any(256 < n < (size or 0) for n, size in padded), padded
    replayed.clear()
    padded.clear()
    off = _tokens(checkpoint, level=level, mixed_graph_max_tokens=0, **chunked)
    assert off == eager and not replayed
    assert any(size > n for n, size in padded if size is not None), padded


@pytest.mark.parametrize("level", [0, 3])
def test_graphs_without_their_own_warmup_change_no_token(checkpoint: Path, level: int) -> None:
    unwarmed_sizes_change_no_token(checkpoint, 1000, level)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_graphs_without_their_own_warmup_change_no_token(checkpoint: Path) -> None:
    """unwarmed_sizes_change_no_token at tp=2, level 3: the all-reduces of sizes 24 and 32 (the
    custom one where this is the process's first tp engine, else NCCL) are first launched inside
    their captures."""
    unwarmed_sizes_change_no_token(checkpoint, 1000, 3, tensor_parallel_size=2)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_compile_levels_change_no_token(checkpoint: Path, level: int) -> None:
    assert _tokens(checkpoint, dtype="float32", level=level) == _tokens(
        checkpoint, dtype="float32", enforce_eager=True
    )


def test_bf16_fast_path_close_to_eager(checkpoint: Path) -> None:
    fast = _tokens(checkpoint)
    eager = _tokens(checkpoint, enforce_eager=True)
    same_first = sum(a[0] == b[0] for a, b in zip(fast, eager, strict=True))
    assert same_first >= len(fast) - 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_fast_path_changes_no_token(checkpoint: Path) -> None:
    """tp=2 with CUDA graphs and level-3 compilation (the all-reduces inside the graphs and the
    compiled pieces: the custom one, NCCL past its size limit) against tp=2 eager, float32: two
    ranks' sum is one addition whichever kernel makes it, so the tokens are the same; and the
    same compiled engine with NCCL only. Steps are queued ahead on both ranks (async
    scheduling). Four tp engines in one process, each shut down before the next starts: the
    first takes the custom all-reduce, the later ones NCCL (custom_all_reduce.py's module
    doc)."""
    custom: list[bool] = []
    first = not custom_all_reduce._rendezvoused  # no tp engine has run in this process yet

    def tokens(**kwargs: Any) -> list[list[int]]:
        llm = LLM(
            str(checkpoint),
            skip_tokenizer_init=True,
            device="cuda",
            tensor_parallel_size=2,
            **{**SMALL_ENGINE, **kwargs},
        )
        custom.append(distributed._custom is not None)
        try:
            outs = llm.generate(_prompts(), GREEDY, use_tqdm=False)
            return [o.outputs[0].token_ids for o in outs]
        finally:
            llm.shutdown()

    compiled = tokens(dtype="float32", level=3)
    eager = tokens(dtype="float32", enforce_eager=True)
    assert compiled == eager
    assert tokens(dtype="float32", level=3, disable_custom_all_reduce=True) == eager
    bf16 = tokens()  # the default fast path: bf16, level 3, graphs
    assert sum(a[0] == b[0] for a, b in zip(bf16, eager, strict=True)) >= len(eager) - 1
    assert custom == [first, False, False, False]


def test_fp8_kv_agreement_with_bf16(checkpoint: Path) -> None:
    """Reported: greedy agreement and prompt-logprob error of fp8 KV (calibrated scales)."""
    bf16 = _tokens(checkpoint, kv_cache_dtype="bf16")
    fp8 = _tokens(checkpoint, kv_cache_dtype="fp8")
    prefix = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        for a, b in zip(bf16, fp8, strict=True)
    ]
    print(f"fp8 KV vs bf16 KV: identical greedy prefix {sum(prefix)}/{sum(map(len, bf16))} tokens")
    assert sum(p > 0 for p in prefix) >= len(prefix) - 2


def test_level3_compiles_each_distinct_piece_once_on_cuda(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the pieces call our Triton kernels (traced with a side-table index per call):
    the last layer's graph and the one every other layer shares make 3 Inductor compiles
    (after attention in each, before it once), however many layers; and no other start-up
    step (the memory profile, warm-up, the captures) compiles again."""
    from atom.executor import compile as compile_module

    pieces: list[torch.fx.GraphModule] = []
    compile_fx = compile_module.compile_fx
    monkeypatch.setattr(
        compile_module, "compile_fx", lambda gm, inputs: pieces.append(gm) or compile_fx(gm, inputs)
    )
    torch._dynamo.reset()
    _tokens(checkpoint, dtype="bfloat16", level=3)
    assert len(pieces) == 3
