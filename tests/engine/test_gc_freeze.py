"""The engine takes its long-lived objects out of the cyclic garbage collector."""

from __future__ import annotations

import gc
import weakref

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
