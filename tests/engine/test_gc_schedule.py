"""The engine runs Python's cyclic collections between steps, never inside one."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from atom import LLM, SamplingParams
from atom.engine.gc_schedule import FULL_DEFER, collect_due, due_generation, engine_collects

THRESHOLDS = (700, 10, 10)


@pytest.mark.parametrize(
    "counts, idle, due",
    [
        ((700, 0, 0), False, None),  # young count not past its threshold
        ((701, 0, 0), False, 0),
        ((701, 11, 0), False, 1),  # ten young collections since the last middle one
        ((701, 11, 11), False, 1),  # a full one is due, but deferred while busy ...
        ((701, 11, 11), True, 2),  # ... until the engine is idle
        ((5, 0, 11), True, 2),  # idle: no allocations needed
        ((5, 11, 10 * FULL_DEFER), False, None),
        ((701, 0, 10 * FULL_DEFER + 1), False, 2),  # ... or deferred FULL_DEFER intervals
    ],
)
def test_due_generation(counts: tuple[int, int, int], idle: bool, due: int | None) -> None:
    assert due_generation(counts, THRESHOLDS, idle) == due


def test_zero_thresholds_turn_collections_off() -> None:
    assert due_generation((10**6, 100, 100), (0, 10, 10), True) is None
    assert due_generation((701, 100, 100), (700, 0, 0), True) == 0


def test_engine_collects_restores_the_collector_state() -> None:
    assert gc.isenabled()
    with engine_collects():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with engine_collects():
            pass
        assert not gc.isenabled()  # the caller had it off: it stays off
    finally:
        gc.enable()
    assert collect_due() is None  # automatic collection on: nothing for the engine to do


@pytest.fixture
def collections() -> Iterator[list[set[str]]]:
    """Each collection that starts: the names of the functions on the stack."""
    seen: list[set[str]] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            frame, names = sys._getframe(0), set()
            while frame is not None:
                names.add(frame.f_code.co_name)
                frame = frame.f_back
            seen.append(names)

    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)


def test_generate_collects_only_between_steps(tiny: Path, collections: list[set[str]]) -> None:
    llm = LLM(str(tiny), skip_tokenizer_init=True, kv_cache_memory_bytes=4 << 20)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(2, 2 + 5 + i))} for i in range(8)]
    collections.clear()  # start-up's own (the freeze) are not the question
    thresholds = gc.get_threshold()
    gc.set_threshold(50, 5, 5)  # low: a short run's allocations are due for every generation
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        gc.set_threshold(*thresholds)
    assert any("collect_due" in names for names in collections), "the engine collected nothing"
    for names in collections:  # the prompts' processing before the loop may collect as usual
        if "step" in names:
            assert "collect_due" in names, "an automatic collection ran in the middle of a step"
    assert gc.isenabled()
