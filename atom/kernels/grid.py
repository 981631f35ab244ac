"""Launch arithmetic for host code: `cdiv` and `next_power_of_2` as plain Python.

Triton's own (`triton.cdiv`, `triton.next_power_of_2`) are constexpr functions behind a wrapper
that unwraps every argument: under torch.compile Dynamo traces ~100 bytecode steps per call, and
the launchers' calls made up half of the steps it traced per layer (an 8B model's Dynamo trace
took 6.3 s of a warm start on an H200). These are a few steps each, and also cheaper eagerly.
"""

from __future__ import annotations

from typing import TypeVar

IntLike = TypeVar("IntLike")  # an int, or a torch.SymInt under dynamic shapes


def cdiv(a: IntLike, b: int) -> IntLike:
    """ceil(a / b) for a >= 0, b > 0."""
    return -(-a // b)  # type: ignore[operator]


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
