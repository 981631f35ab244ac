"""Python's cyclic garbage collector on the engine's schedule.

An automatic collection runs wherever an allocation crosses a threshold: often in the middle of
a step's submission, and the device then idles until the host gets past it. In the nano-vllm
bench's GPU trace (H200, 2026-11-29) the steps idle for more than 10% of their time were such
stalls: 0.1-1.3 ms between two uploads of one step's inputs, and 4-21 ms full collections
between steps (a 2-core CPU host: 4 full collections, up to 6.7 ms, in 600 steps at batch 256).

While the engine runs (`engine_collects()`: around LLM.generate's loop and the engine-core
process's loop; ATOM_ENGINE_GC=0 leaves it alone) automatic collection is off, and EngineCore
runs the collection Python's thresholds call for right after it has queued a step
(`collect_due`): the device then has that step, and with async scheduling the one before it, to
work through while the host collects. The young generations are collected there when due. A full
collection, which walks every object the engine's requests hold, waits for an idle engine, or for
FULL_DEFER times its usual interval under a load that never lets up. Objects alive at start-up
are frozen (core.py) and never walked.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

FULL_DEFER = 10  # a busy engine's full collection waits for this many of its usual intervals
ENGINE_GC_ENV = "ATOM_ENGINE_GC"  # 0: Python's automatic collection stays on


@contextmanager
def engine_collects() -> Iterator[None]:
    """Automatic collection off for the block (as it was after): the engine collects instead."""
    enabled = gc.isenabled()
    if os.environ.get(ENGINE_GC_ENV, "1") != "0":
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def due_generation(
    counts: tuple[int, int, int], thresholds: tuple[int, int, int], idle: bool
) -> int | None:
    """The generation to collect now, None for none: Python's rule (the oldest generation whose
    count passed its threshold: allocations for generation 0, collections of the generation
    below for the others), except that a full collection waits for an idle engine or for
    FULL_DEFER times its threshold. A threshold of 0 turns its generation's collections off."""
    (young, middle, old), (t_young, t_middle, t_old) = counts, thresholds
    if t_young <= 0:
        return None  # gc.set_threshold(0): collection disabled
    full_due = t_old > 0 and old > t_old
    if idle and full_due:
        return 2
    if young <= t_young:
        return None  # as in Python, every collection waits for allocations past the threshold
    if full_due and old > FULL_DEFER * t_old:
        return 2
    if t_middle > 0 and middle > t_middle:
        return 1
    return 0


def collect_due(idle: bool = False) -> int | None:
    """Runs the collection that is due while the engine holds collection (None otherwise, and
    when automatic collection is on); returns the generation collected."""
    if gc.isenabled():
        return None
    generation = due_generation(gc.get_count(), gc.get_threshold(), idle)
    if generation is not None:
        gc.collect(generation)
    return generation
