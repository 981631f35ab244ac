"""Token counts of ungraphed steps (executor/eager_steps.py): the sizes they pad to, and the
start-up's run of every layer GEMM at each."""

from __future__ import annotations

import pytest
import torch

from atom.executor.eager_steps import eager_step_size, eager_step_sizes, load_gemm_kernels
from atom.models.qwen3 import Qwen3ForCausalLM
from tests.conftest import tiny_qwen3_config


@pytest.mark.parametrize("cap", [16384, 3000, 512])
def test_sizes_hold_every_count_with_at_most_a_sixteenth_more(cap: int) -> None:
    sizes = eager_step_sizes(0, cap)
    assert sizes == sorted(set(sizes)) and sizes[-1] == cap
    for n in range(1, cap + 1):
        size = eager_step_size(n, cap)
        assert size in sizes and n <= size <= cap
        assert size - n < max(16, n / 16), (n, size)
    # Past the largest mixed graph (2048 tokens): 16 sizes an octave.
    assert eager_step_sizes(2048, 16384)[:3] == [2176, 2304, 2432]
    assert len(eager_step_sizes(2048, 16384)) == 48
    assert eager_step_sizes(2048, 2100) == [2100] and eager_step_sizes(512, 512) == []


def test_load_gemm_kernels_runs_each_distinct_gemm_at_every_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Qwen3's layers hold four distinct GEMMs (qkv, o, gate/up, down), however many layers; each
    runs once at each size on contiguous rows."""
    model = Qwen3ForCausalLM(tiny_qwen3_config(), 64)
    seen = []
    linear = torch.nn.functional.linear

    def spy(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        assert x.is_contiguous()
        seen.append((x.shape[0], tuple(w.shape)))
        return linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    assert load_gemm_kernels(model, [32, 48]) == 8
    shapes = {(64 + 2 * 32, 64), (64, 64), (192, 64), (64, 96)}
    assert sorted(seen) == sorted((rows, s) for rows in (32, 48) for s in shapes)
    assert [rows for rows, _ in seen[:4]] == [48] * 4  # largest first
    assert load_gemm_kernels(model, []) == 0
