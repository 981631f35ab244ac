"""Full garbage collections wait while the engine has work.

Objects alive at start-up are frozen (`core.freeze_long_lived_objects`), so a full (generation 2)
collection walks what the engine's requests made since: their token lists among them, about a
million list items at 256 requests of 1-2k tokens. In the nano-vllm bench's second run on an
H200 (2026-11-29, traced) four such collections of 11.6-18.5 ms ran between steps and the GPU
waited through each: the run's only stalls of over 4 ms. The first run after start-up had none
(Python holds a full collection back until a quarter as many objects as the last one kept have
reached the old generation, and the last one kept all of start-up's), so the measured output
rate did not show them; a server that runs for minutes meets them about once a second.

While requests run (`LLM.generate`'s loop; the engine-core process's loop while its engine has
work) Python's third threshold is DEFER times higher, so a full collection comes DEFER times more
rarely; the young generations' collections (a few ms per bench run in all) are left as they are.
Leaving the loop, or an idle engine, restores it, and the engine-core process runs a full
collection that came due while it waits for requests (`collect_if_due`).
"""

from __future__ import annotations

import gc

DEFER = 100

_saved: tuple[int, int, int] | None = None  # the thresholds before defer_full_collections


def defer_full_collections() -> None:
    """Raises the third threshold DEFER times (idempotent; nothing when collection is off by
    threshold)."""
    global _saved
    if _saved is not None:
        return
    young, middle, old = gc.get_threshold()
    if young > 0 and old > 0:
        _saved = (young, middle, old)
        gc.set_threshold(young, middle, old * DEFER)


def restore_full_collections() -> None:
    """The thresholds defer_full_collections found, unless someone set others since."""
    global _saved
    if _saved is None:
        return
    young, middle, old = _saved
    _saved = None
    if gc.get_threshold() == (young, middle, old * DEFER):
        gc.set_threshold(young, middle, old)


def collect_if_due() -> bool:
    """A full collection when more young-generation collections ran since the last one than the
    (restored) third threshold allows: what Python would run at its next collection, run where
    nothing waits on it."""
    if _saved is not None or not gc.isenabled():
        return False
    old = gc.get_threshold()[2]
    if old <= 0 or gc.get_count()[2] <= old:
        return False
    gc.collect()
    return True
