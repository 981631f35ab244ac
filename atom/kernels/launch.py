"""Triton launches that a start-up precompile can turn into compiles (executor/precompile.py).

`launch(kernel, grid, ...)` is `kernel[grid](...)`; inside `compile_only()` it is
`kernel.warmup(...)` instead: the variant those arguments select is compiled (or found in Triton's
caches) and nothing runs on the device, so the call's tensors may hold anything. The mode is a
context variable: it holds in the thread (or task) that set it only, never in the main thread's
real launches. Under Dynamo (a launcher traced into a compiled layer) it is a plain launch and
the mode is not read: `is_dynamo_compiling` is a trace-time constant, False when code runs, while
`torch.compiler.is_compiling()` is one process-wide flag in newer torch, True on every thread while
Dynamo compiles on one (the precompile thread's launches would then run).

Programmatic dependent launch (PDL, Hopper and later): a kernel given `PDL=pdl(x)` calls
`pdl_start(PDL)` before it touches another kernel's data. It waits there for the kernel before
it in the stream to finish (its writes visible), then lets the next kernel launch; `launch` gives
such a kernel the launch attribute, so its programs start while the one before it drains: launch
latency and tails overlap the kernels beside them, in CUDA graphs as well (programmatic edges).
The order of results is the stream's; the next kernel's programs may take free SMs early, never
run ahead of the wait. Only reads of the step's inputs (uploaded before its first kernel, written
by none) may come before the wait: attention reads query_start_loc and seq_lens there, so that
their chain of loads overlaps the kernel before. Off under Dynamo (Inductor launches the traced
kernels itself), in the interpreter, before sm90, and with ATOM_PDL=0.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_COMPILE_ONLY: ContextVar[bool] = ContextVar("atom_triton_compile_only", default=False)
PDL_ENV = "ATOM_PDL"
INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
_PDL = os.environ.get(PDL_ENV, "1") != "0" and not INTERPRET


@functools.cache
def _sm90(index: int) -> bool:
    """An NVIDIA GPU of compute capability 9 or later (ROCm reports gfx9 as major 9 too)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9


def pdl(t: Tensor) -> bool:
    """Whether kernels launched on t's device use programmatic dependent launch."""
    if torch.compiler.is_dynamo_compiling() or not _PDL or not t.is_cuda:
        return False
    index = t.device.index
    return _sm90(torch.cuda.current_device() if index is None else index)


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Wait for the kernel before, then release the next: before a PDL kernel's first access to
    another kernel's data and before any return (a grid none of whose programs waited would let
    the next kernel run ahead of the one before)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    if kwargs.get("PDL"):
        kwargs["launch_pdl"] = True
    if compiling_only():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def compiling_only() -> bool:
    """Whether launches on this thread only compile (inside compile_only(), not under Dynamo):
    a launcher may then skip the buffers only a real launch needs."""
    return not torch.compiler.is_dynamo_compiling() and _COMPILE_ONLY.get()


@contextmanager
def plain_launches() -> Iterator[None]:
    """No PDL for launches inside (process-wide, for one thread's benchmark): a tuner timing a
    kernel back to back with itself would otherwise credit it the overlap of its own neighbours,
    which the engine's (a norm, attention) do not give (RESULTS, twenty-ninth sitting)."""
    global _PDL
    saved, _PDL = _PDL, False
    try:
        yield
    finally:
        _PDL = saved


@contextmanager
def compile_only() -> Iterator[None]:
    token = _COMPILE_ONLY.set(True)
    try:
        yield
    finally:
        _COMPILE_ONLY.reset(token)
