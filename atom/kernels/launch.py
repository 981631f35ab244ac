"""Triton launches that a start-up precompile can turn into compiles (executor/precompile.py).

`launch(kernel, grid, ...)` is `kernel[grid](...)`; inside `compile_only()` it is
`kernel.warmup(...)` instead: the variant those arguments select is compiled (or found in Triton's
caches) and nothing runs on the device, so the call's tensors may hold anything. The mode is a
context variable: it holds in the thread (or task) that set it only, never in the main thread's
real launches. Under Dynamo (a launcher traced into a compiled layer) it is a plain launch and
the mode is not read: `is_dynamo_compiling` is a trace-time constant, False when code runs, while
`torch.compiler.is_compiling()` is one process-wide flag in newer torch, True on every thread while
Dynamo compiles on one (the precompile thread's launches would then run).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

_COMPILE_ONLY: ContextVar[bool] = ContextVar("atom_triton_compile_only", default=False)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    if not torch.compiler.is_dynamo_compiling() and _COMPILE_ONLY.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


@contextmanager
def compile_only() -> Iterator[None]:
    token = _COMPILE_ONLY.set(True)
    try:
        yield
    finally:
        _COMPILE_ONLY.reset(token)
