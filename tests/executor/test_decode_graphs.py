"""Decode graphs without a GPU: which context caps each batch size gets, which graph a step
replays, and the LM head writing a shared logits buffer (the capture itself runs on the GPU
machine: tests/gpu/test_fast_path.py)."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from atom.executor.cuda_graphs import DecodeGraphs, context_caps, paused_gc
from atom.executor.mixed_graphs import MixedGraphs
from atom.executor.model_runner import ModelRunner
from atom.executor.sampler import Sampler, SamplingMetadata
from atom.kernels.attention_config import (
    SHORT_CONTEXT,
    DecodeKind,
    choose_num_splits,
)
from atom.layers.attention import Attention
from atom.layers.embedding import ParallelLMHead
from atom.layers.mla import MLAAttention


def _caps(
    max_model_len: int,
    kv_heads: list[int],
    sizes: list[int],
    fill_twice: bool = True,
    unified: bool = True,
    head_dim: int = 128,
) -> dict[int, list[int]]:
    kinds = {DecodeKind(h, 4, head_dim, fill_twice, unified) for h in kv_heads}
    return context_caps(sizes, max_model_len, kinds, 132)  # an H100/H200's SMs


def test_small_batches_get_a_short_graph() -> None:
    """A kind whose tiles no context changes (MLA's kernel, unified=False; head dims past 128)
    gets a short graph where the splits differ."""
    sizes = [1, 2, 4, 8, 16, 32, 48, 512]
    caps = _caps(4096, [8], sizes, unified=False)
    for size in sizes:
        splits = choose_num_splits(size, 8, 1, 4096, 132)
        assert caps[size] == ([SHORT_CONTEXT, 4096] if splits > 1 else [4096]), size
    # 32 x 8 heads < 2 x 132 SMs: two splits; 48 x 8 fill every SM twice
    assert caps[32] == [SHORT_CONTEXT, 4096] and caps[48] == [4096]
    # A model whose layers differ: a size splits if any layer kind does.
    assert _caps(4096, [8, 1], [48], unified=False)[48] == [SHORT_CONTEXT, 4096]
    # Contexts never past the short graph's: one graph a size.
    assert _caps(SHORT_CONTEXT, [8], [1])[1] == [SHORT_CONTEXT]
    # MLA's latent attention leaves a batch that covers every SM once unsplit: one graph.
    assert _caps(4096, [1], [144], fill_twice=False, unified=False)[144] == [4096]
    assert _caps(4096, [1], [144], unified=False)[144] == [SHORT_CONTEXT, 4096]


def test_short_contexts_get_their_tiles() -> None:
    """The unified kernel's decode takes other tiles up to SHORT_CONTEXT: every size gets a
    graph for it, where contexts can be longer."""
    sizes = [1, 48, 256, 512]
    assert _caps(4096, [8], sizes) == {size: [SHORT_CONTEXT, 4096] for size in sizes}
    assert _caps(SHORT_CONTEXT, [8], sizes) == {size: [SHORT_CONTEXT] for size in sizes}
    assert _caps(300, [8], [48]) == {48: [300]}
    # Head dims past 128 keep their tiles: only the split sizes get one.
    assert _caps(4096, [8], [1, 48], head_dim=256) == {1: [SHORT_CONTEXT, 4096], 48: [4096]}


def test_decode_kinds_of_the_layers() -> None:
    """The kinds the runner's caps follow: the unified kernel's (heads per KV head, head dim
    padded) and MLA's (its own tiles and split rule); only plain layers warm shorter caps up
    with attention launches alone."""
    assert Attention(32, 128, 0.1, 8).decode_kind() == DecodeKind(8, 4, 128)
    assert Attention(8, 80, 0.1, 8).decode_kind() == DecodeKind(8, 1, 128)
    mla = MLAAttention(16, 64, 16, 16, 16, 0.1)
    assert mla.decode_kind() == DecodeKind(1, 16, 80, False, False)


class _Graph:
    def __init__(self, log: list[tuple[int, int]], key: tuple[int, int]) -> None:
        self.log, self.key = log, key

    def replay(self) -> None:
        self.log.append(self.key)


def test_a_step_replays_the_smallest_cap_over_its_context() -> None:
    graphs = DecodeGraphs({1: [4096, 511], 32: [4096]})
    log: list[tuple[int, int]] = []
    for key in [(1, 511), (1, 4096), (32, 4096)]:  # what capture() fills
        graphs._graphs[key] = _Graph(log, key)  # type: ignore[assignment]
        graphs._outputs[key] = torch.full((1,), key[1])
    assert 1 in graphs and 32 in graphs and 2 not in graphs
    assert graphs.padded_size(1) == 1 and graphs.padded_size(2) == 32
    assert graphs.padded_size(33) is None
    for size, context, cap in [(1, 1, 511), (1, 511, 511), (1, 512, 4096), (1, 4096, 4096),
                               (32, 7, 4096)]:  # fmt: skip
        assert graphs.replay(size, context).item() == cap
    assert log == [(1, 511), (1, 511), (1, 4096), (1, 4096), (32, 4096)]
    assert len(graphs) == 3 and graphs.draw_graphs == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_head_writes_the_shared_logits(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    head = ParallelLMHead(100, 16).to(dtype)
    head.weight.data.normal_()
    hidden = torch.randn(3, 16, dtype=dtype)
    shared = torch.full((8, head.padded_vocab_size), float("nan"), dtype=dtype)
    logits = head.compute_logits(hidden, out=shared[:3])
    assert logits.data_ptr() == shared.data_ptr() and logits.shape == (3, 100)
    torch.testing.assert_close(logits, head.compute_logits(hidden))
    torch.testing.assert_close(logits, F.linear(hidden, head.weight))
    assert shared[3:].isnan().all()  # rows past the batch untouched


def test_sample_replays_the_draw_graph_only_for_a_plain_step_after_a_replay() -> None:
    replays: list[int] = []

    def replay_sample(size: int) -> torch.Tensor:
        replays.append(size)
        return torch.arange(size) + 100

    graphs = SimpleNamespace(draw_graphs=1, replay_sample=replay_sample)
    runner = SimpleNamespace(sampler=Sampler(fused=True), graphs=graphs)
    logits = torch.randn(3, 50)
    plain = SamplingMetadata(temperature=torch.zeros(3), all_greedy=True, seeds=torch.arange(3))
    out = ModelRunner._sample(runner, logits, plain, 4)  # type: ignore[arg-type]
    assert out.sampled.tolist() == [100, 101, 102] and replays == [4]
    greedy = logits.argmax(-1).tolist()
    assert ModelRunner._sample(runner, logits, plain, None).sampled.tolist() == greedy  # type: ignore[arg-type]
    logprobs = SamplingMetadata(
        temperature=torch.zeros(3), all_greedy=True, seeds=torch.arange(3), max_num_logprobs=1
    )
    out = ModelRunner._sample(runner, logits, logprobs, 4)  # type: ignore[arg-type]
    assert out.sampled.tolist() == greedy and out.logprobs is not None and replays == [4]


class _ResetCounter:
    def __init__(self) -> None:
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1


def test_release_destroys_every_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor-parallel rank's NCCL group can only be left once no graph that captured its
    collectives lives: the runner's shutdown destroys them all, forward and draw graphs."""
    syncs: list[int] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    graphs = DecodeGraphs({1: [64], 2: [32, 64]})
    made = {(1, 64): _ResetCounter(), (2, 32): _ResetCounter(), (2, 64): _ResetCounter()}
    draws = {1: _ResetCounter(), 2: _ResetCounter()}
    graphs._graphs.update(made)  # type: ignore[arg-type]
    graphs._samplers.update(draws)  # type: ignore[arg-type]
    graphs._outputs.update({key: torch.zeros(1) for key in made})
    mixed = MixedGraphs([16, 32])
    mixed_made = {16: _ResetCounter(), 32: _ResetCounter()}
    mixed._graphs.update(mixed_made)  # type: ignore[arg-type]
    runner = SimpleNamespace(
        graphs=graphs,
        mixed_graphs=mixed,
        _join_precompile=lambda: None,
        profiler=SimpleNamespace(running=False),
        attn_layers=[],
        device=torch.device("cpu"),
    )
    ModelRunner.shutdown(runner)  # type: ignore[arg-type]
    resets = [g.resets for g in (*made.values(), *draws.values(), *mixed_made.values())]
    assert resets == [1] * 7
    assert syncs == [1, 1] and runner.graphs is None and runner.mixed_graphs is None
    assert len(graphs) == 0 and graphs.draw_graphs == 0 and 1 not in graphs and len(mixed) == 0
    # Where a rank died, a replay may wait for it forever: no sync, CUDA frees a graph in
    # flight when it completes.
    graphs._graphs[(1, 64)] = made[(1, 64)]  # type: ignore[assignment]
    runner.graphs = graphs
    ModelRunner.shutdown(runner, sync=False)  # type: ignore[arg-type]
    assert made[(1, 64)].resets == 2 and syncs == [1, 1] and runner.graphs is None


@pytest.mark.parametrize("enabled", [True, False])
def test_captures_pause_the_collector_and_restore_it(enabled: bool) -> None:
    """No automatic collection inside (a capture's frees), the collector as it was after, an
    exception too; nothing frozen, so no full collection was needed first."""
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        frozen = gc.get_freeze_count()
        with pytest.raises(RuntimeError), paused_gc():
            assert not gc.isenabled() and gc.get_freeze_count() == frozen
            raise RuntimeError("a failed capture")
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
