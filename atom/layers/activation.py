"""Gated activations: the hidden_act names GatedMLP computes as SiLU-and-mul (the op after the
gate/up GEMM, or fused into it: linear_ops.linear_silu_and_mul)."""

from __future__ import annotations

GATED_SILU = ("silu", "swiglu")


def check_gated_act(name: str) -> None:
    if name not in GATED_SILU:
        raise ValueError(f"unsupported hidden_act {name!r}")
