"""Compilation levels of the model forward, as in the reference:

  0  eager
  1  Dynamo as is: torch.compile(backend="eager", fullgraph=True), a check that the model traces
  2  Dynamo once: the whole graph through Inductor
  3  piecewise: each decoder layer's FX graph split at its attention op (an opaque custom op:
     torch.ops.atom.attention, or mla_attention for latent attention), Inductor on the pieces
     before and after it, attention run eagerly between them

Level 3 compiles the decoder layers, not the whole forward: the layers of a class run one
function, and Dynamo traces it once and reuses the graph for every other layer, whose weights
are the graph's inputs; again for the last layer (it has no next layer's norm to run in its
down_proj: forward_add_norm), and for the first where its input norm's sums are narrower than
a down_proj's (rms_norm_rows writes one column, a fused down_proj one a tile: models of more than
one tile of hidden features). Tracing all 32 layers of an
8B model took 5-6 s of every start, warm compile cache or not. The embedding, the final norm and
the loop between layers run eagerly (a gather, a norm, Python: as fast as compiled); decode runs
as CUDA graphs over the whole forward anyway.

The token dimension is dynamic, so one compile serves every batch of 2 tokens or more. Dynamo
specialises sizes 0 and 1; rather than a second compile (15-25 s of an 8B model's start-up when
the whole model was traced), one token runs the eager code. (Neither a size-oblivious dimension,
still specialised by the fake-tensor stride checks, nor an unbacked one, whose sizes make the
Triton launchers' checks data-dependent guards, avoided it.) Pieces that are the same code (the
part before attention is alike in the last layer and the others) are compiled once.
Inductor's FX-graph and AOT caches live under the compile cache directory, so a second start with
the same model and code skips Inductor.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch._higher_order_ops.triton_kernel_wrap import (
    kernel_side_table,
    triton_kernel_wrapper_functional,
    triton_kernel_wrapper_mutation,
)
from torch._inductor.compile_fx import compile_fx
from torch.utils import _pytree as pytree

import atom.layers.attention  # registers torch.ops.atom.attention
import atom.layers.mla  # noqa: F401  registers torch.ops.atom.mla_attention
from atom.cache_dir import cache_root

logger = logging.getLogger(__name__)

SPLITTING_OPS = (
    torch.ops.atom.attention,
    torch.ops.atom.attention.default,
    torch.ops.atom.qkv_attention,  # the same with the qkv projection inside (Llama, Qwen3)
    torch.ops.atom.qkv_attention.default,
    torch.ops.atom.mla_attention,  # MLA's latent attention (DeepSeek)
    torch.ops.atom.mla_attention.default,
)
TRITON_KERNEL_CALLS = (triton_kernel_wrapper_mutation, triton_kernel_wrapper_functional)
Forward = Callable[[Tensor, Tensor], Tensor]


def default_cache_dir() -> Path:
    return cache_root() / "torch_compile"


def compile_forward(model: nn.Module, level: int, cache_dir: Path | None = None) -> Forward:
    """The model's forward at `level`. Level 3 compiles the decoder layers in place
    (`model.model.layers`): the model's own forward then runs them."""
    if level == 0:
        return model.forward
    _use_cache_dir(cache_dir or default_cache_dir())
    # Dynamo keys its cache on the code object: every engine built in one process (tests, a
    # benchmark sweep) adds entries for the same model class's forward.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4096
    )
    if level == 3:
        compile_layers(model.model.layers, PiecewiseBackend())
        return model.forward
    backend = {1: "eager", 2: "inductor"}[level]
    compiled = torch.compile(model.forward, backend=backend, fullgraph=True)

    def run(input_ids: Tensor, positions: Tensor) -> Tensor:
        if input_ids.shape[0] > 1:  # one graph for every token count
            torch._dynamo.mark_dynamic(input_ids, 0)
            torch._dynamo.mark_dynamic(positions, 0)
        return compiled(input_ids, positions)

    return run


def compile_layers(layers: Iterable[nn.Module], backend: Callable[..., Any]) -> None:
    """Each layer's forward becomes its class's compiled forward (one per class, shared)."""
    compiled: dict[type, Callable[..., Any]] = {}
    for layer in layers:
        cls = type(layer)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, backend=backend, fullgraph=True)
        layer.forward = _CompiledLayer(layer, compiled[cls])


class _CompiledLayer:
    """A decoder layer's forward(positions, x, residual, ...) through its class's compiled
    function; one token runs the layer's own (eager) forward."""

    def __init__(self, layer: nn.Module, compiled: Callable[..., Any]) -> None:
        self.eager = layer.forward  # bound, or a --mark-trace wrapper of it
        self.layer = layer
        self.compiled = compiled
        self.marked = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        positions = next(a for a in args if isinstance(a, Tensor))  # the first argument, [T]
        if positions.shape[0] <= 1:
            return self.eager(*args, **kwargs)
        if not self.marked:
            # The first compiled call traces (or finds) the graph with a symbolic token count;
            # later calls of any count >= 2 match it unmarked. mark_dynamic costs ~0.1 ms a call:
            # 3 per layer on every eager forward was milliseconds of each prefill's host time.
            # Every tensor, also inside tuples (NormedRows), is token-major: [T] positions,
            # [T, H] states, [T, parts] a norm's sums.
            for t in pytree.tree_leaves((args, kwargs)):
                if isinstance(t, Tensor):
                    torch._dynamo.mark_dynamic(t, 0)
            self.marked = True
        return self.compiled(self.layer, *args, **kwargs)


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
    """A torch.compile backend: split at attention, Inductor on the pieces in between. One
    instance compiles every graph of a model, each distinct piece once."""

    def __init__(self) -> None:
        self.compiled: dict[tuple[str, tuple[str, ...]], Callable[..., Any]] = {}
        self.num_graphs = 0

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        split_gm, attention_parts = split_at_attention(gm)
        fake_mode = torch._guards.detect_fake_mode(example_inputs)
        assert fake_mode is not None
        # Lifted parameters arrive as real tensors: run every input as a fake one.
        fake = [fake_mode.from_tensor(t) if isinstance(t, Tensor) else t for t in example_inputs]
        pieces = _CompilePieces(split_gm, attention_parts, self.compiled)
        with fake_mode:
            pieces.run(*fake)
        self.num_graphs += 1
        logger.info(
            "piecewise compile of graph %d: %d Inductor pieces around %d attention ops (%d new, "
            "%.1f s in Inductor)",
            self.num_graphs,
            len(list(split_gm.named_children())) - len(attention_parts),
            len(attention_parts),
            pieces.num_new,
            pieces.seconds,
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

    def __init__(
        self,
        module: fx.GraphModule,
        attention_parts: set[str],
        compiled: dict[tuple[str, tuple[str, ...]], Callable[..., Any]],
    ) -> None:
        super().__init__(module)
        self.attention_parts = attention_parts
        self.compiled = compiled  # by (structure, arguments): shared by the backend's graphs
        self.num_new = 0
        self.seconds = 0.0  # in Inductor (a cache hit included)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = super().call_module(target, args, kwargs)
        if target not in self.attention_parts:
            piece = getattr(self.module, target)
            # Alike pieces (weights are inputs) compile once.
            key = (_structure(piece), _describe(args))
            if key not in self.compiled:
                start = time.perf_counter()
                self.compiled[key] = compile_fx(piece, list(args))
                self.seconds += time.perf_counter() - start
                self.num_new += 1
            setattr(self.module, target, _Piece(self.compiled[key]))
        return out


def _structure(gm: fx.GraphModule) -> str:
    """The graph with its node names replaced by positions: alike pieces compare equal.
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


def _describe(args: Sequence[Any]) -> tuple[str, ...]:
    """Each argument's type, dtype, shape and strides. Two graphs name their symbolic sizes apart
    (s26, s47): they are renamed in order of appearance, so alike pieces compare equal."""
    described = [
        f"{a.dtype} {a.device} {tuple(a.shape)} {a.stride()}"
        if isinstance(a, Tensor)
        else f"{type(a).__name__} {a}"
        for a in args
    ]
    names: dict[str, str] = {}

    def rename(symbol: re.Match[str]) -> str:
        return names.setdefault(symbol.group(), f"s{len(names)}")

    return tuple(re.sub(r"\b[su]\d+\b", rename, d) for d in described)


class _Piece(torch.nn.Module):
    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)
