"""The launch module's process-wide PDL switch for benchmarks, and the order of a PDL kernel's
wait and release in its compiled code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


# A kernel that starts with pdl_start (SiLU-and-mul's), compiled for sm90 (not interpreted) with
# each PDL value: the order of griddepcontrol's wait and release in its PTX.
_ORDER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from atom.kernels.launch import PDL_EARLY
from atom.kernels.silu_and_mul import _silu_and_mul_kernel

for pdl in (True, PDL_EARLY):
    sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "d": "i32", "x_s_row": "i32",
           "BLOCK": "constexpr", "PDL": "constexpr"}
    src = ASTSource(fn=_silu_and_mul_kernel, signature=sig, constexprs={"BLOCK": 64, "PDL": pdl})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    order = [op for line in ptx.splitlines() for op in ("wait", "launch_dependents")
             if f"griddepcontrol.{op}" in line]
    print(pdl, *order)
"""


def test_early_release_comes_before_the_wait() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _ORDER], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == ["True wait launch_dependents", "2 launch_dependents wait"]


def test_pdl_value_by_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an sm90 device: True, PDL_EARLY with ATOM_PDL=early; off, False."""
    device = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))
    monkeypatch.setattr(launch, "_sm90", lambda index: True)
    monkeypatch.setattr(launch, "_PDL", True)
    assert launch.pdl(device) is True  # type: ignore[arg-type]
    monkeypatch.setattr(launch, "_EARLY", True)
    assert launch.pdl(device) == launch.PDL_EARLY  # type: ignore[arg-type]
    monkeypatch.setattr(launch, "_PDL", False)
    assert launch.pdl(device) is False  # type: ignore[arg-type]
