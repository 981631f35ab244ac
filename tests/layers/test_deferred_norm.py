"""RMSNorm deferred into the GEMMs around it (kernels/gemv_norm.py, layers/norm.py's NormedRows):
what ops decides on CUDA, taken here on the CPU for steps of 1-16 rows, through the references
and through the Triton kernels in the interpreter. Llama's and Qwen3's greedy tokens equal those
of the unfused norms; a projection with a bias (its norm runs apart, still deferred) and the
several-rank path (the norm after an all-reduce) keep them too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from atom.kernels import gemv, gemv_norm, gemv_rope, linear_ops
from atom.layers.linear import RowParallelLinear
from atom.layers.norm import NormedRows, RMSNorm
from tests.layers.test_qkv_projection import _checkpoint, _tokens


def _decode_rows(x: torch.Tensor) -> bool:
    k = x.shape[-1]
    return 0 < (x.numel() // k if k else 0) <= gemv.MAX_M


@pytest.fixture
def deferred(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Norms of 1-16 rows defer on the CPU; returns the row counts of the deferred norms after
    a linear layer."""
    monkeypatch.setattr(linear_ops, "defers_norm", _decode_rows)
    rows: list[int] = []
    real = linear_ops._linear_add_rms_norm_ref

    def counted(x: torch.Tensor, *args: Any) -> Any:
        if linear_ops.defers_norm(x):
            rows.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(linear_ops, "_linear_add_rms_norm_ref", counted)
    return rows


def _kernels_on_the_cpu(monkeypatch: pytest.MonkeyPatch, rows: list[int]) -> None:
    """ops' CPU paths take the Triton kernels (interpreted): the fused norm, gemv's row scale,
    the fused qkv projection with its row scale."""

    def add_norm(x: torch.Tensor, *args: Any) -> Any:
        if linear_ops.defers_norm(x):
            rows.append(x.shape[0])
        return linear_ops._linear_add_rms_norm(x, *args)

    def linear(
        x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, scale: Any
    ) -> torch.Tensor:
        return F.linear(x, w, b) if scale is None else linear_ops.small_batch_linear(x, w, b, scale)

    monkeypatch.setattr(linear_ops, "_linear_add_rms_norm_ref", add_norm)
    monkeypatch.setattr(linear_ops, "_linear_ref", linear)
    monkeypatch.setattr(
        linear_ops,
        "fuses_qkv_rope",
        lambda x, w, d, r, neox: gemv_rope.fuses(x.shape[0], w, d, r, neox),
    )
    monkeypatch.setattr(gemv_rope, "gemv_rope_and_cache_ref", gemv_rope.gemv_rope_and_cache)


@pytest.mark.parametrize("kernel", ["references", "triton"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_deferred_norm_changes_no_token(
    family: str,
    kernel: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    deferred: list[int],
) -> None:
    path = _checkpoint(family, tmp_path)
    with monkeypatch.context() as undeferred:
        undeferred.setattr(linear_ops, "defers_norm", lambda x: False)
        baseline = _tokens(path)
    if kernel == "triton":
        _kernels_on_the_cpu(monkeypatch, deferred)
    assert _tokens(path) == baseline
    # o_proj's and down_proj's norms (2 layers, the last down_proj's goes to the final norm)
    assert deferred and max(deferred) <= gemv.MAX_M and 3 in deferred, deferred


def test_a_biased_projection_defers_its_norm_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """o_proj with a bias: its norm runs as rms_norm's deferred variant (one column of sums)."""
    import transformers

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(head_dim=16, attention_bias=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    baseline = _tokens(tmp_path)
    widths: list[int] = []
    real = gemv_norm.deferred_norm_ref

    def counted(r: torch.Tensor, w: torch.Tensor, width: int | None = None) -> Any:
        widths.append(width or r.shape[-1])
        return real(r, w, width)

    monkeypatch.setattr(linear_ops, "defers_norm", _decode_rows)
    monkeypatch.setattr(gemv_norm, "deferred_norm_ref", counted)
    assert _tokens(tmp_path) == baseline
    assert config.hidden_size in widths  # the biased o_proj's and the first layer's norms


def test_norm_after_an_all_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    """forward_add_norm over several ranks: the linear layer (its all-reduce), then
    linear_ops.add_rms_norm_rows; the deferred rows through the next linear layer equal the
    normed rows through it; past 16 rows the rows are normed."""
    monkeypatch.setattr(linear_ops, "defers_norm", _decode_rows)
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, 1e-5)
    norm.weight.data = torch.rand(48, generator=gen) + 0.5
    linear = RowParallelLinear(32, 48)
    linear.weight.data = torch.randn(48, 32, generator=gen) / 6
    linear.tp_size = 2  # a world of one rank all-reduces to itself
    x, residual = torch.randn(3, 32, generator=gen), torch.randn(3, 48, generator=gen)
    w_next = torch.randn(20, 48, generator=gen)
    normed, stream = linear.forward_add_norm(x, residual, norm)
    assert isinstance(normed, NormedRows) and normed.sumsq.shape == (3, 1)
    expected, expected_stream = norm(linear(x), residual)
    torch.testing.assert_close(stream, expected_stream)
    y = linear_ops.linear(normed.rows, w_next, None, normed.sumsq, normed.eps)
    torch.testing.assert_close(y, F.linear(expected, w_next), atol=1e-5, rtol=1e-5)
    many, many_res = torch.randn(40, 32, generator=gen), torch.randn(40, 48, generator=gen)
    normed, _ = linear.forward_add_norm(many, many_res, norm)
    torch.testing.assert_close(normed.rows, norm(linear(many), many_res)[0])
