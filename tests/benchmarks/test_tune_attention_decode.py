"""benchmarks/tune_attention_decode.py: its configs' syntax (the sweep itself needs a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import tune_attention_decode as tune


def test_parse_config() -> None:
    """tile:warps:stages[:maxnreg][:d][:sN]: a register cap (0 for none), descriptor tiles, KV
    splits forced."""
    assert tune.parse_config("128:4:2") == (128, 4, 2, None, False, None)
    assert tune.parse_config("128:4:2:168") == (128, 4, 2, 168, False, None)
    assert tune.parse_config("32:1:6:d") == (32, 1, 6, None, True, None)
    assert tune.parse_config("16:1:8:0:d:s2") == (16, 1, 8, None, True, 2)
    assert tune.parse_config("128:4:2:s3") == (128, 4, 2, None, False, 3)
