"""Decode graphs of two micro-batches on two streams (executor/micro_batch.py) change no token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from atom.executor import model_runner
from tests.gpu.test_fast_path import _tokens, checkpoint  # noqa: F401  (the fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(("mode", "level"), [("chain", 3), ("free", 3), ("chain", 0)])
def test_micro_batches_change_no_token(
    checkpoint: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    level: int,
) -> None:
    eager = _tokens(checkpoint, dtype="float32", enforce_eager=True)
    calls = []
    split = model_runner.forward_micro_batches

    def spy(*args: Any, **kwargs: Any) -> None:
        calls.append(len(args[1]))
        split(*args, **kwargs)

    monkeypatch.setattr(model_runner, "forward_micro_batches", spy)
    monkeypatch.setenv("ATOM_DECODE_OVERLAP", mode)
    monkeypatch.setenv("ATOM_DECODE_OVERLAP_MIN", "4")  # graphs 4, 8, 16: halves of 2-8 rows
    sizes = [1, 2, 4, 8, 16]
    assert _tokens(checkpoint, dtype="float32", level=level, cudagraph_capture_sizes=sizes) == eager
    assert calls and set(calls) == {2}  # captured (and warmed up) as two micro-batches
