"""The launch module's process-wide PDL switch for benchmarks."""

from __future__ import annotations

import pytest

from atom.kernels import launch


def test_plain_launches_turns_pdl_off_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "_PDL", True)
    with launch.plain_launches():
        assert launch._PDL is False
    assert launch._PDL is True
    with pytest.raises(RuntimeError), launch.plain_launches():
        raise RuntimeError("a failed timing")
    assert launch._PDL is True  # restored after an exception too
