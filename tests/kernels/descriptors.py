"""Records whether each attention launch got its K/V tensor descriptors (CPU and GPU tests)."""

from __future__ import annotations

import pytest

import atom.kernels.unified_attention as ua


def record_descriptors(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """From now on each unified_attention launch appends whether kv_descriptors built its
    descriptors (not None: the descriptor tiles ran, not the pointer fallback)."""
    built: list[bool] = []
    plain = ua.kv_descriptors

    def descriptors(*args: object) -> object:
        built.append((found := plain(*args)) is not None)
        return found

    monkeypatch.setattr(ua, "kv_descriptors", descriptors)
    return built
