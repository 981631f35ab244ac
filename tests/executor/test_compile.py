"""Compilation levels on the CPU (Inductor emits C++ here): each level computes what eager does.
Level 3 compiles the model's layers in place: its tests build their own runner."""

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


def _tiny_runner(path: str | Path, num_layers: int = 3) -> ModelRunner:
    config = transformers.Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
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
    with set_forward_context(ForwardContext(runner.attn_layers, None)), torch.inference_mode():
        return forward(ids, torch.arange(n))


@pytest.mark.parametrize("level", [1, 2, 3])
def test_compiled_forward_matches_eager(level: int, tmp_path) -> None:
    runner = _tiny_runner(tmp_path / "model")
    sizes = (7, 13, 1)  # a dynamic token count, then the size Dynamo specialises
    expected = [_run(runner, runner.model.forward, n) for n in sizes]
    compiled = compile_forward(runner.model, level, cache_dir=tmp_path / "cache")
    for n, want in zip(sizes, expected, strict=True):
        torch.testing.assert_close(_run(runner, compiled, n), want, atol=1e-5, rtol=1e-5)


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
        # Llama's layers project q, k and v inside the op (Attention.project_and_attend)
        assert [str(n.target) for n in nodes] in (
            ["atom.qkv_attention"],
            ["atom.qkv_attention.default"],
        )


def _count_compiles(monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """(Dynamo graphs given to the piecewise backend, pieces given to Inductor), as they come."""
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
    return graphs, pieces


@pytest.mark.parametrize("num_layers", [3, 6])
def test_level3_traces_two_layers_and_compiles_three_pieces(
    num_layers: int, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Level 3 whatever the depth: Dynamo traces one layer and the last (no next layer's norm
    to run in its down_proj), every other layer reuses the first graph; Inductor compiles 3
    pieces (after attention in each of the two graphs, before it once: the two are alike). One
    token runs eagerly. (Past one gemv tile of hidden features the first layer's input sums are
    narrower than a down_proj's, a third graph; this model's 64 features are one tile.)"""
    runner = _tiny_runner(tmp_path / "model", num_layers)
    sizes = (5, 1, 13, 2)
    expected = [_run(runner, runner.model.forward, n) for n in sizes]
    graphs, pieces = _count_compiles(monkeypatch)
    marks: list[int] = []  # mark_dynamic calls per forward: ~0.1 ms each, first forward only
    mark_dynamic = torch._dynamo.mark_dynamic
    monkeypatch.setattr(
        torch._dynamo, "mark_dynamic", lambda t, dim: marks.append(1) or mark_dynamic(t, dim)
    )
    torch._dynamo.reset()
    compiled = compile_forward(runner.model, 3, cache_dir=tmp_path / "cache")
    calls = []
    for n, want in zip(sizes, expected, strict=True):
        torch.testing.assert_close(_run(runner, compiled, n), want, atol=1e-5, rtol=1e-5)
        calls.append(len(marks))
    assert len(graphs) == 2
    assert len(pieces) == 3
    assert calls[0] > 0 and calls[-1] == calls[0]  # later counts match the graphs unmarked


def test_runner_runs_one_token_eagerly(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-token forward (decode batch 1, a one-token chunk) takes the eager code, so no
    Dynamo graph is compiled for Dynamo's size-1 specialisation."""
    runner = _tiny_runner(tmp_path / "model")
    graphs, _ = _count_compiles(monkeypatch)
    torch._dynamo.reset()
    expected = [_run(runner, runner.model.forward, n) for n in (5, 1, 9, 1)]
    monkeypatch.setattr(
        runner, "compiled_forward", compile_forward(runner.model, 3, cache_dir=tmp_path)
    )
    for n in (1, 1):
        torch.testing.assert_close(_run(runner, runner.forward, n), expected[1])
    assert graphs == []
    for n, want in zip((5, 1, 9, 1), expected, strict=True):
        torch.testing.assert_close(_run(runner, runner.forward, n), want, atol=1e-5, rtol=1e-5)
    assert len(graphs) == 2  # the last layer and the others, for every count > 1


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


def test_cuda_path_traces_two_layers_and_compiles_three_pieces() -> None:
    """The CUDA path traced on the CPU: Dynamo told that Triton works, the layers' norms and SiLU
    routed to their Triton launchers (traced; their launches are dropped from the pieces so that
    the CPU can run them; rotary runs inside the attention op, out of Dynamo's sight). Each traced
    launch gets its own side-table kernel (a one-config Autotuner per num_warps= launch) and
    constants, and the layers' graphs must not depend on them: 4 layers give 2 Dynamo graphs and
    3 Inductor pieces (the whole-model trace on an H200 once gave 33 pieces for 32 layers). In a
    fresh interpreter: Dynamo caches what it learnt about Triton's classes."""
    pytest.importorskip("triton")
    code = (
        "import torch.utils._triton as s; s.has_triton = lambda: True\n"  # before Dynamo loads
        "import runpy, sys; t = runpy.run_path(sys.argv[1])\n"  # this file, by its path
        "print('COMPILES=%d GRAPHS=%d' % t['cuda_path_compiles']())"
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
    assert "COMPILES=3 GRAPHS=2" in out.stdout.splitlines(), out.stdout[-500:] + out.stderr[-3000:]


def cuda_path_compiles() -> tuple[int, int]:
    from atom.kernels import ops
    from atom.kernels import rms_norm as norm_kernels
    from atom.kernels import silu_and_mul as silu_kernels

    ops.rms_norm = norm_kernels.rms_norm
    ops.fused_add_rms_norm = norm_kernels.fused_add_rms_norm
    ops.silu_and_mul = silu_kernels.silu_and_mul
    pieces: list[torch.fx.GraphModule] = []

    def without_launches(gm: torch.fx.GraphModule, inputs: list) -> object:
        """The piece minus its Triton launches: the outputs keep their shapes (not values), so
        the next layer is traced too."""
        pieces.append(gm)
        for node in list(gm.graph.nodes):
            if node.target in compile_module.TRITON_KERNEL_CALLS and not node.users:
                gm.graph.erase_node(node)
        gm.recompile()
        return gm.forward

    compile_module.compile_fx = without_launches
    backend = compile_module.PiecewiseBackend()
    with tempfile.TemporaryDirectory() as path:
        runner = _tiny_runner(path, num_layers=4)
        compile_module.compile_layers(runner.model.model.layers, backend)
        ids = torch.arange(5)
        context = set_forward_context(ForwardContext(runner.attn_layers, None))
        try:
            with context, torch.inference_mode():
                runner.model(ids, ids)  # the final norm, eager, cannot launch Triton here
        except Exception:  # expected: after the layers
            traceback.print_exc()  # shown by the test if a count is wrong
    return len(pieces), backend.num_graphs


def test_compile_points_triton_at_inductors_ptxas(monkeypatch, tmp_path) -> None:
    """Triton's cache key holds the ptxas version, and Inductor switches Triton to torch's ptxas
    when it first compiles: a start that loads its pieces from the cache must use the same one
    before any eager kernel compiles, or every start recompiles them (tests/gpu: the H200)."""
    from torch._inductor.runtime import compile_tasks

    calls: list[bool] = []
    monkeypatch.setattr(compile_tasks, "_set_triton_ptxas_path", lambda: calls.append(True))
    compile_forward(torch.nn.Identity(), level=1, cache_dir=tmp_path)
    assert calls == [True]
