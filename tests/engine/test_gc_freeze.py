"""The engine takes its long-lived objects out of the cyclic garbage collector."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from atom import LLM
from atom.engine import core
from atom.engine.core import freeze_long_lived_objects


class _Cycle:
    def __init__(self) -> None:
        self.me = self  # only the cyclic collector can free it


def test_freeze_then_a_later_engine_reclaims_a_dropped_one() -> None:
    freeze_long_lived_objects()
    assert gc.get_freeze_count() > 0
    dropped = _Cycle()
    freeze_long_lived_objects()  # frozen with the first engine's objects
    ref = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert ref() is not None  # frozen: the collector leaves it
    freeze_long_lived_objects()  # the next engine: unfreeze, collect, freeze
    assert ref() is None
    gc.unfreeze()


def test_a_dropped_llm_is_freed_before_the_next_one_builds_its_model(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An LLM dropped without shutdown() (a notebook's second LLM) and held only by reference
    cycles (as on a GPU, where compiled and captured graphs refer back to it; here one made by
    hand) is collected when the next GPU engine starts, before its model and memory profile: its
    KV cache and weights would otherwise count against the new engine's budget (an H200 run left
    a second SmolLM2 LLM no KV cache at all)."""
    first = LLM(str(tiny), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
    first.engine.executor.cycle = first.engine.executor  # type: ignore[attr-defined]
    runner = weakref.ref(first.engine.executor)
    del first
    gc.collect()
    assert runner() is not None  # frozen with its engine: the collector alone leaves it
    core.reclaim_dropped_engines("cpu")  # a fixed KV budget: nothing to reclaim first
    assert runner() is not None
    core.reclaim_dropped_engines("cuda")
    assert runner() is None
    order: list[str] = []
    reclaim, build = core.reclaim_dropped_engines, core.create_executor
    monkeypatch.setattr(core, "reclaim_dropped_engines", lambda d: (order.append(d), reclaim(d)))
    monkeypatch.setattr(core, "create_executor", lambda c: (order.append("build"), build(c))[1])
    LLM(str(tiny), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20).shutdown()
    assert order == ["cpu", "build"]  # an engine reclaims before it builds its model


def test_shutdown_frees_the_kv_cache(tiny: Path) -> None:
    """shutdown() drops every layer's cache, even where something else keeps the model."""
    llm = LLM(str(tiny), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
    layers = llm.engine.executor.attn_layers  # type: ignore[attr-defined]
    assert all(layer.kv_cache.numel() for layer in layers)
    llm.shutdown()
    assert not any(layer.kv_cache.numel() for layer in layers)
