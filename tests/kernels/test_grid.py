"""The host-side launch arithmetic equals Triton's own."""

from __future__ import annotations

import pytest

from atom.kernels.grid import cdiv, next_power_of_2

triton = pytest.importorskip("triton")


def test_next_power_of_2_matches_triton() -> None:
    for n in [*range(0, 1100), 4095, 4096, 4097, 151_936, 2**20 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_cdiv_matches_triton() -> None:
    for a in range(0, 300):
        for b in (1, 2, 3, 7, 16, 128):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
