"""Compilation levels of the model forward, as in the reference:

  0  eager
  1  Dynamo as is: torch.compile(backend="eager", fullgraph=True), a check that the model traces
  2  Dynamo once: the whole graph through Inductor
  3  piecewise: the FX graph split at every attention op (an opaque custom op: torch.ops.atom.
     attention, or mla_attention for latent attention), Inductor on each
     piece between them, attention run eagerly between the compiled pieces

The token dimension is dynamic, so one compile serves every batch of 2 tokens or more. Dynamo
specialises sizes 0 and 1; rather than a second compile (15-25 s of an 8B model's start-up), the
runner runs one token through the eager model. (Neither a size-oblivious dimension, still
specialised by the fake-tensor stride checks, nor an unbacked one, whose sizes make the Triton
launchers' checks data-dependent guards, avoided it.) At level 3 the pieces between two
attentions are the same code for every layer: each distinct piece is compiled once (3 Inductor
compiles instead of one per layer).
Inductor's FX-graph and AOT caches live under the compile cache directory, so a second start with
the same model and code skips Inductor.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx
from torch._higher_order_ops.triton_kernel_wrap import (
    kernel_side_table,
    triton_kernel_wrapper_functional,
    triton_kernel_wrapper_mutation,
)
from torch._inductor.compile_fx import compile_fx

import atom.layers.attention  # registers torch.ops.atom.attention
import atom.layers.mla  # noqa: F401  registers torch.ops.atom.mla_attention

logger = logging.getLogger(__name__)

SPLITTING_OPS = (
    torch.ops.atom.attention,
    torch.ops.atom.attention.default,
    torch.ops.atom.mla_attention,  # MLA's latent attention (DeepSeek)
    torch.ops.atom.mla_attention.default,
)
TRITON_KERNEL_CALLS = (triton_kernel_wrapper_mutation, triton_kernel_wrapper_functional)
Forward = Callable[[Tensor, Tensor], Tensor]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atom" / "torch_compile"


def compile_forward(forward: Forward, level: int, cache_dir: Path | None = None) -> Forward:
    if level == 0:
        return forward
    _use_cache_dir(cache_dir or default_cache_dir())
    # Dynamo keys its cache on the code object: every engine built in one process (tests, a
    # benchmark sweep) adds entries for the same model class's forward.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4096
    )
    backend: str | Callable[..., Any] = {1: "eager", 2: "inductor", 3: PiecewiseBackend()}[level]
    compiled = torch.compile(forward, backend=backend, fullgraph=True)

    def run(input_ids: Tensor, positions: Tensor) -> Tensor:
        if input_ids.shape[0] > 1:  # one graph for every token count
            torch._dynamo.mark_dynamic(input_ids, 0)
            torch._dynamo.mark_dynamic(positions, 0)
        return compiled(input_ids, positions)

    return run


def _use_cache_dir(path: Path) -> None:
    """Inductor reads its cache location from the environment when it first needs it."""
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    _use_inductors_ptxas()


def _use_inductors_ptxas() -> None:
    """Point Triton at the ptxas Inductor uses (torch's own, torch/bin/ptxas, where the wheel
    ships one) before any kernel compiles.

    Inductor sets TRITON_PTXAS_PATH when it first compiles a kernel, and Triton's cache key holds
    the ptxas version. So the eager kernels (attention, sampler, ...) of a start that compiled
    its pieces were built with torch's ptxas, those of a start that loaded them from the cache
    with Triton's bundled one: each start missed the other's Triton cache (16 kernels, ~7.6 s of
    an 8B model's warm start on an H200)."""
    try:
        from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path
    except ImportError:  # moved in some torch version: Inductor compiles as it did
        return
    _set_triton_ptxas_path()


class PiecewiseBackend:
    """A torch.compile backend: split at attention, Inductor on the pieces in between."""

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        split_gm, attention_parts = split_at_attention(gm)
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        assert fake_mode is not None
        # Lifted parameters arrive as real tensors: run every input as a fake one.
        fake = [fake_mode.from_tensor(t) if isinstance(t, Tensor) else t for t in example_inputs]
        pieces = _CompilePieces(split_gm, attention_parts)
        with fake_mode:
            pieces.run(*fake)
        logger.info(
            "piecewise compile: %d Inductor pieces (%d distinct, %.1f s in Inductor) around %d "
            "attention ops",
            len(list(split_gm.named_children())) - len(attention_parts),
            len(pieces.compiled),
            pieces.seconds,
            len(attention_parts),
        )
        difference = pieces.first_difference()
        if difference is not None:
            logger.info(
                "the first two pieces between attentions differ, so compile apart (expected only "
                "where the layers differ); first difference: %s",
                difference[:600],
            )
        return split_gm


def split_at_attention(gm: fx.GraphModule) -> tuple[fx.GraphModule, set[str]]:
    """Each attention call gets a piece of its own; the nodes between two calls share one."""
    part, parts, attention = 0, {}, set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and node.target in SPLITTING_OPS:
            part += 1
            parts[node] = part
            attention.add(f"submod_{part}")
            part += 1
        else:
            parts[node] = part
    split = torch.fx.passes.split_module.split_module(
        gm, None, lambda node: parts[node], keep_original_order=True
    )
    return split, attention


class _CompilePieces(torch.fx.Interpreter):
    """Runs the split graph on fake inputs, compiling each non-attention piece with the fake
    arguments it actually receives (symbolic token counts included)."""

    def __init__(self, module: fx.GraphModule, attention_parts: set[str]) -> None:
        super().__init__(module)
        self.attention_parts = attention_parts
        self.compiled: dict[tuple[str, tuple[str, ...]], Callable[..., Any]] = {}
        self.keys: list[tuple[str, tuple[str, ...]]] = []  # each piece's, in order
        self.seconds = 0.0  # in Inductor (a cache hit included)

    def first_difference(self) -> str | None:
        """Where the first two pieces between attentions differ (alike layers should not; a dense
        layer before MoE ones does): the first unequal line of their graphs or arguments. With
        fewer than three layers there are not two such pieces."""
        if len(self.keys) < 4 or self.keys[1] == self.keys[2]:
            return None
        (graph_a, args_a), (graph_b, args_b) = self.keys[1], self.keys[2]
        lines_a, lines_b = graph_a.splitlines() + list(args_a), graph_b.splitlines() + list(args_b)
        pairs = zip(lines_a, lines_b, strict=False)  # unequal lengths: "lengths differ"
        return next((f"{a!r} vs {b!r}" for a, b in pairs if a != b), "lengths differ")

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = super().call_module(target, args, kwargs)
        if target not in self.attention_parts:
            piece = getattr(self.module, target)
            # The pieces between two attentions are the same code for every layer (weights are
            # inputs): Inductor compiles each distinct piece once.
            key = (_structure(piece), tuple(_describe(a) for a in args))
            self.keys.append(key)
            if key not in self.compiled:
                start = time.perf_counter()
                self.compiled[key] = compile_fx(piece, list(args))
                self.seconds += time.perf_counter() - start
            setattr(self.module, target, _Piece(self.compiled[key]))
        return out


def _structure(gm: fx.GraphModule) -> str:
    """The graph with its node names replaced by positions: two layers' pieces compare equal.
    A Triton kernel call names its kernel and constant arguments by indices into a side table
    that grow with every call Dynamo traces (a launch with num_warps= even becomes a new
    one-config Autotuner each time): they are compared by content."""
    index: dict[fx.Node, int] = {}
    lines = []
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        if node.target in TRITON_KERNEL_CALLS and "constant_args_idx" in kwargs:
            kwargs = dict(kwargs)
            constants = kernel_side_table.get_constant_args(kwargs.pop("constant_args_idx"))
            kwargs["constant_args"] = sorted(constants.items())
            kwargs["kernel"] = _kernel_identity(kwargs.pop("kernel_idx"))
        target = "" if node.op == "placeholder" else node.target
        lines.append(f"{node.op} {target} {args} {kwargs}")
    return "\n".join(lines)


def _kernel_identity(kernel_idx: int) -> str:
    """The traced kernel: its JIT function (one object per kernel source), and for an Autotuner
    what Inductor reads from it: the configs (their pre-hooks too) and the arguments reset or
    restored between benchmark runs."""
    kernel = kernel_side_table.get_kernel(kernel_idx)
    configs = getattr(kernel, "configs", None)
    if configs is None:
        return f"jit {id(kernel)}"
    described = [(str(c), id(getattr(c, "pre_hook", None))) for c in configs]
    resets = tuple(getattr(kernel, "reset_to_zero", None) or ())
    restores = tuple(getattr(kernel, "restore_value", None) or ())
    return f"autotuned {id(kernel.fn)} {described} {resets} {restores}"


def _describe(arg: Any) -> str:
    if isinstance(arg, Tensor):
        return f"{arg.dtype} {arg.device} {tuple(arg.shape)} {arg.stride()}"
    return f"{type(arg).__name__} {arg}"


class _Piece(torch.nn.Module):
    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)
