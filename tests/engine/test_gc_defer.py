"""Full garbage collections wait while requests run (gc_defer.py): the third threshold is
raised in LLM.generate's loop and restored after it (a failing step too), and a collection that
came due runs where nothing waits."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from atom import LLM, SamplingParams
from atom.engine import gc_defer
from atom.engine.core import EngineCore


@pytest.fixture(autouse=True)
def thresholds() -> Iterator[tuple[int, int, int]]:
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield gc.get_threshold()
    gc_defer.restore_full_collections()
    gc.set_threshold(*saved)


def test_defer_and_restore(thresholds: tuple[int, int, int]) -> None:
    gc_defer.defer_full_collections()
    gc_defer.defer_full_collections()  # idempotent
    assert gc.get_threshold() == (700, 10, 10 * gc_defer.DEFER)
    gc_defer.restore_full_collections()
    assert gc.get_threshold() == thresholds
    gc_defer.restore_full_collections()  # nothing deferred: nothing changes
    assert gc.get_threshold() == thresholds


def test_a_threshold_set_meanwhile_is_kept() -> None:
    gc_defer.defer_full_collections()
    gc.set_threshold(500, 5, 5)
    gc_defer.restore_full_collections()
    assert gc.get_threshold() == (500, 5, 5)


def test_collection_off_by_threshold_stays_off() -> None:
    gc.set_threshold(0)
    gc_defer.defer_full_collections()
    assert gc.get_threshold()[0] == 0
    gc_defer.restore_full_collections()
    assert gc.get_threshold()[0] == 0


def test_collect_if_due() -> None:
    gc.collect()
    assert not gc_defer.collect_if_due()  # just collected
    gc_defer.defer_full_collections()
    for _ in range(12):  # more middle-generation collections than the third threshold allows
        gc.collect(1)
    assert gc.get_count()[2] > 10
    assert not gc_defer.collect_if_due()  # deferred: not while the engine is busy
    gc_defer.restore_full_collections()
    assert gc_defer.collect_if_due()
    assert gc.get_count()[2] == 0


def test_raised_while_generate_steps(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    step = EngineCore.step

    def recorded(self: EngineCore, *args: Any) -> list:
        seen.append(gc.get_threshold()[2])
        if len(seen) == 20:
            raise RuntimeError("a failing step")
        return step(self, *args)

    monkeypatch.setattr(EngineCore, "step", recorded)
    llm = LLM(str(tiny), skip_tokenizer_init=True)
    prompts = [{"prompt_token_ids": [3, 4, 5]}, {"prompt_token_ids": [6, 7]}]
    llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert seen and set(seen) == {10 * gc_defer.DEFER}
    assert gc.get_threshold() == (700, 10, 10)  # the loop is over: restored
    with pytest.raises(RuntimeError, match="a failing step"):
        llm.generate(prompts, SamplingParams(max_tokens=30, ignore_eos=True), use_tqdm=False)
    assert gc.get_threshold() == (700, 10, 10)  # also when a step fails
