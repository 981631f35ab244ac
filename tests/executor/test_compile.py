"""Compilation levels on the CPU (Inductor emits C++ here): each level computes what eager does."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import transformers

from atom.args import EngineArgs
from atom.executor import compile as compile_module
from atom.executor.compile import compile_forward, split_at_attention
from atom.executor.forward_context import ForwardContext, set_forward_context
from atom.executor.model_runner import ModelRunner

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    return _tiny_runner(tmp_path_factory.mktemp("qwen3"))


def _tiny_runner(path: str | Path) -> ModelRunner:
    config = transformers.Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=512,
        architectures=["Qwen3ForCausalLM"],
    )
    config.save_pretrained(path)
    args = EngineArgs(model=str(path), load_format="dummy", device="cpu", skip_tokenizer_init=True)
    return ModelRunner(args.create_engine_config())


def _run(runner: ModelRunner, forward, n: int) -> torch.Tensor:
    ids = torch.arange(n) % 256
    with set_forward_context(ForwardContext(runner.attn_by_name, None)), torch.inference_mode():
        return forward(ids, torch.arange(n))


@pytest.mark.parametrize("level", [1, 2, 3])
def test_compiled_forward_matches_eager(runner: ModelRunner, level: int, tmp_path) -> None:
    compiled = compile_forward(runner.model.forward, level, cache_dir=tmp_path)
    for n in (7, 13, 1):  # a dynamic token count, then the size Dynamo specialises
        expected = _run(runner, runner.model.forward, n)
        torch.testing.assert_close(_run(runner, compiled, n), expected, atol=1e-5, rtol=1e-5)


def test_piecewise_split_isolates_each_attention(runner: ModelRunner) -> None:
    graphs = []

    def capture(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    _run(runner, torch.compile(runner.model.forward, backend=capture, fullgraph=True), 5)
    split, attention = split_at_attention(graphs[0])
    assert len(attention) == 3  # one piece per layer's attention
    for name in attention:
        nodes = [n for n in getattr(split, name).graph.nodes if n.op == "call_function"]
        assert [str(n.target) for n in nodes] in (["atom.attention"], ["atom.attention.default"])


def test_each_distinct_piece_compiles_once(
    runner: ModelRunner, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Level 3 on 3 layers: one Dynamo graph for token counts > 1 (and one for 1, Dynamo's
    specialisation), each with 3 Inductor compiles for its 4 pieces: before the first attention,
    between two (twice, same code), after the last."""
    graphs, pieces = [], []
    backend_call = compile_module.PiecewiseBackend.__call__
    compile_fx = compile_module.compile_fx
    monkeypatch.setattr(
        compile_module.PiecewiseBackend,
        "__call__",
        lambda self, gm, inputs: graphs.append(gm) or backend_call(self, gm, inputs),
    )
    monkeypatch.setattr(
        compile_module,
        "compile_fx",
        lambda gm, inputs: pieces.append(gm) or compile_fx(gm, inputs),
    )
    torch._dynamo.reset()
    compiled = compile_forward(runner.model.forward, 3, cache_dir=tmp_path)
    for n in (5, 1, 13, 2):
        expected = _run(runner, runner.model.forward, n)
        torch.testing.assert_close(_run(runner, compiled, n), expected, atol=1e-5, rtol=1e-5)
    assert len(graphs) == 2
    assert len(pieces) == 6


def test_runner_runs_one_token_eagerly(
    runner: ModelRunner, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-token forward (decode batch 1, a one-token chunk) takes the eager model, so no
    second Dynamo graph is compiled for Dynamo's size-1 specialisation."""
    graphs = []
    backend_call = compile_module.PiecewiseBackend.__call__
    monkeypatch.setattr(
        compile_module.PiecewiseBackend,
        "__call__",
        lambda self, gm, inputs: graphs.append(gm) or backend_call(self, gm, inputs),
    )
    torch._dynamo.reset()
    monkeypatch.setattr(
        runner, "compiled_forward", compile_forward(runner.model.forward, 3, cache_dir=tmp_path)
    )
    for n in (5, 1, 9, 1):
        expected = _run(runner, runner.model.forward, n)
        torch.testing.assert_close(_run(runner, runner.forward, n), expected, atol=1e-5, rtol=1e-5)
    assert len(graphs) == 1


_KERNEL = object()  # stands for a traced Triton kernel in the side table


def _triton_call_graph(constants: dict) -> torch.fx.GraphModule:
    """x -> triton_kernel_wrapper_mutation(x) -> x, as Dynamo traces a user Triton kernel: its
    constant arguments registered in the side table (a new index per traced call)."""
    from torch._higher_order_ops.triton_kernel_wrap import (
        kernel_side_table,
        triton_kernel_wrapper_mutation,
    )

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(
        triton_kernel_wrapper_mutation,
        kwargs={
            "kernel_idx": kernel_side_table.add_kernel(_KERNEL),
            "constant_args_idx": kernel_side_table.add_constant_args(dict(constants)),
            "grid": [(x, 1, 1)],
            "tma_descriptor_metadata": {},
            "kwargs": {"x_ptr": x},
        },
    )
    graph.output(x)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_triton_kernel_pieces_compare_by_constant_args_content() -> None:
    """Each layer's Triton call gets its own side-table index; equal constants still make one
    piece (on CUDA every layer's piece had differed: 29 Inductor compiles instead of 3)."""
    structure = compile_module._structure
    a = _triton_call_graph({"eps": 1e-6, "BLOCK": 1024})
    b = _triton_call_graph({"BLOCK": 1024, "eps": 1e-6})
    c = _triton_call_graph({"eps": 1e-5, "BLOCK": 1024})
    assert structure(a) == structure(b)
    assert structure(a) != structure(c)


def test_pieces_that_differ_name_their_first_difference(runner: ModelRunner) -> None:
    pieces = compile_module._CompilePieces(
        torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), set()
    )
    a = compile_module._structure(_triton_call_graph({"eps": 1e-6}))
    b = compile_module._structure(_triton_call_graph({"eps": 1e-5}))
    pieces.keys = [("first", ()), (a, ("f32",)), (b, ("f32",)), ("last", ())]
    difference = pieces.first_difference()
    assert difference is not None and "1e-06" in difference and "1e-05" in difference
    pieces.keys = [("first", ()), (a, ("f32",)), (a, ("f32",)), ("last", ())]
    assert pieces.first_difference() is None
    pieces.keys = [("first", ()), (a, ("f32",)), ("last", ())]  # two layers: no two middles
    assert pieces.first_difference() is None


def test_cuda_path_pieces_compile_once_per_distinct_layer() -> None:
    """The CUDA path traced on the CPU: Dynamo told that Triton works, the layers' norms, rotary
    and SiLU routed to their Triton launchers (traced, never run here). Each traced launch gets
    its own side-table kernel (a one-config Autotuner per num_warps= launch) and constants; the
    pieces must still compare equal: 3 Inductor compiles for 3 layers (an H200 showed 4). In a
    fresh interpreter: Dynamo caches what it learnt about Triton's classes."""
    pytest.importorskip("triton")
    code = (
        "import torch.utils._triton as s; s.has_triton = lambda: True\n"  # before Dynamo loads
        "import runpy, sys; t = runpy.run_path(sys.argv[1])\n"  # this file, by its path
        "print(f'COMPILES={t[\"cuda_path_compiles\"]()}')"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real Triton kernels
    out = subprocess.run(
        [sys.executable, "-c", code, __file__],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "COMPILES=3" in out.stdout.splitlines(), out.stdout[-500:] + out.stderr[-3000:]


def cuda_path_compiles() -> int:
    from atom.kernels import ops
    from atom.kernels import rms_norm as norm_kernels
    from atom.kernels import rotary as rotary_kernels
    from atom.kernels import silu_and_mul as silu_kernels

    ops.rms_norm = norm_kernels.rms_norm
    ops.fused_add_rms_norm = norm_kernels.fused_add_rms_norm
    ops.rotary_embedding = rotary_kernels.rotary_embedding
    ops.silu_and_mul = silu_kernels.silu_and_mul
    pieces: list[torch.fx.GraphModule] = []
    compile_module.compile_fx = lambda gm, inputs: pieces.append(gm) or gm.forward
    with tempfile.TemporaryDirectory() as path:
        runner = _tiny_runner(path)
        compiled = torch.compile(
            runner.model.forward, backend=compile_module.PiecewiseBackend(), fullgraph=True
        )
        ids, positions = torch.arange(5), torch.arange(5)
        torch._dynamo.mark_dynamic(ids, 0)
        torch._dynamo.mark_dynamic(positions, 0)
        context = set_forward_context(ForwardContext(runner.attn_by_name, None))
        try:
            with context, torch.inference_mode():
                compiled(ids, positions)  # traced and split; Triton cannot run here
        except Exception:  # expected: the pieces were compiled, then the run could not launch
            traceback.print_exc()  # shown by the test if the count is wrong
    return len(pieces)


def test_compile_points_triton_at_inductors_ptxas(monkeypatch, tmp_path) -> None:
    """Triton's cache key holds the ptxas version, and Inductor switches Triton to torch's ptxas
    when it first compiles: a start that loads its pieces from the cache must use the same one
    before any eager kernel compiles, or every start recompiles them (tests/gpu: the H200)."""
    from torch._inductor.runtime import compile_tasks

    calls: list[bool] = []
    monkeypatch.setattr(compile_tasks, "_set_triton_ptxas_path", lambda: calls.append(True))
    compile_forward(lambda ids, positions: ids, level=1, cache_dir=tmp_path)
    assert calls == [True]
