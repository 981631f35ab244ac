"""Runs a script with real Triton (no interpreter), in its own process: this one's kernels were
defined for the interpreter (conftest.py). For compiling kernels for sm90 on the CPU machine."""

from __future__ import annotations

import functools
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any


def run_compiled(script: str, timeout: float = 300) -> str:
    """The script's stdout; fails the test with its stderr's end if it exits non-zero."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env,
                         cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _compile(make: Callable[[Any], tuple[Any, dict, Any]], job: Any) -> tuple[int, Any]:
    import triton
    from triton.backends.compiler import GPUTarget

    source, options, tag = make(job)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return kernel.metadata.shared, tag  # a compiled kernel does not pickle


def compile_in_parallel(
    make: Callable[[Any], tuple[Any, dict, Any]], jobs: Iterable[Any]
) -> Iterator[tuple[int, Any]]:
    """(shared memory bytes, tag) of each job, in order, compiled for sm90 on every core (a
    run_compiled script's many variants: one after another they took minutes of the CPU suite).
    make(job) gives (ASTSource, compile options, tag); forked workers, so it may be a script's
    own function."""
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=context) as pool:
        yield from pool.map(functools.partial(_compile, make), jobs)
