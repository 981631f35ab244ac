"""Runs a script with real Triton (no interpreter), in its own process: this one's kernels were
defined for the interpreter (conftest.py). For compiling kernels for sm90 on the CPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_compiled(script: str, timeout: float = 300) -> str:
    """The script's stdout; fails the test with its stderr's end if it exits non-zero."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env,
                         cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout
