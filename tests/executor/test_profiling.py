"""Step labels and --mark-trace tags: the grammar, and tags that stay out of compiled graphs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
import transformers

from atom.args import EngineArgs, FlexibleArgumentParser
from atom.executor.compile import compile_forward
from atom.executor.forward_context import ForwardContext, set_forward_context
from atom.executor.model_runner import ModelRunner
from atom.executor.profiling import CAPTURE_TRACES, TorchProfiler, tag_modules
from atom.executor.trace_labels import draft_label, step_label


@pytest.mark.parametrize(
    ("qsl", "seq_lens", "num_seqs", "decode_only", "graph", "label"),
    [
        ([0, 5, 8], [5, 3], 2, False, None, "prefill[bs=2 tok=8 ctx=[5, 3]]"),
        ([0, 7], [7], 1, False, None, "prefill[bs=1 tok=7 ctx=7]"),
        ([0, 4, 5, 6], [9, 20, 30], 3, False, None, "prefill[bs=3 tok=6 ctx=[9, 20, 30] p=1 d=2]"),
        ([0, 1, 2, 3, 4], [6, 4, 0, 0], 2, True, 4, "decode[bs=2/4 tok=2]"),
        ([0, 1, 2], [6, 4], 2, True, 2, "decode[bs=2/2 tok=2]"),
        ([0, 1, 2], [6, 4], 2, True, None, "eager_decode[bs=2 tok=2 ctx=[6, 4]]"),
        (list(range(8)), [10, 11, 12, 13, 14, 15, 16], 7, True, None,
         "eager_decode[bs=7 tok=7 ctx=[10, 11, 12]...+4]"),
    ],
)  # fmt: skip
def test_step_label_grammar(
    qsl: list[int],
    seq_lens: list[int],
    num_seqs: int,
    decode_only: bool,
    graph: int | None,
    label: str,
) -> None:
    assert step_label(qsl, seq_lens, num_seqs, decode_only, graph) == label


def test_draft_label() -> None:
    assert draft_label(0, 3, 4) == "draft[0/3 bs=4]"


def test_mark_trace_flag_spellings() -> None:
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    for flag in ("--mark-trace", "--mark_trace"):
        assert EngineArgs.from_cli_args(parser.parse_args([flag])).mark_trace
    assert not EngineArgs.from_cli_args(parser.parse_args([])).mark_trace


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    return _tagged_runner(tmp_path_factory.mktemp("qwen3"))


def _tagged_runner(path: Path) -> ModelRunner:
    config = transformers.Qwen3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=512,
        architectures=["Qwen3ForCausalLM"],
    )
    config.save_pretrained(path)
    args = EngineArgs(
        model=str(path),
        load_format="dummy",
        device="cpu",
        skip_tokenizer_init=True,
        mark_trace=True,
    )
    return ModelRunner(args.create_engine_config())


def _profiled(runner: ModelRunner, forward, n: int) -> set[str]:
    ids = torch.arange(n) % 256
    with (
        set_forward_context(ForwardContext(runner.attn_layers, None)),
        torch.inference_mode(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        forward(ids, torch.arange(n))
    return {e.name for e in prof.events()}


def test_eager_forward_tags_every_module(runner: ModelRunner) -> None:
    names = _profiled(runner, runner.model.forward, 5)
    for layer in (0, 1):
        for module in ("", ".self_attn.qkv_proj", ".self_attn.attn", ".mlp.down_proj"):
            assert f"model.layers.{layer}{module}" in names
    assert "model.embed_tokens" in names and "model.norm" in names


def test_compiled_forward_keeps_only_attention_tags(runner: ModelRunner, tmp_path: Path) -> None:
    """No graph break (fullgraph), no recompile across token counts; attention, an opaque op that
    runs eagerly, keeps its tag."""
    torch._dynamo.reset()
    compiled = compile_forward(runner.model, 1, cache_dir=tmp_path)
    names = _profiled(runner, compiled, 7)
    with torch._dynamo.config.patch(error_on_recompile=True):
        names |= _profiled(runner, compiled, 13)
    assert {"model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"} <= names
    assert "model.layers.0.mlp" not in names


def test_capture_trace_shows_compiled_ranges_as_tags(tmp_path: Path) -> None:
    """A capture trace of a level-3 forward: Inductor's `## Call CompiledFxGraph` ranges are
    user annotations there as in run traces (a GPU sitting found them as cpu_op, so replayed
    compiled kernels came out untagged). Its own runner: level 3 compiles the layers in place."""
    runner = _tagged_runner(tmp_path / "model")
    torch._dynamo.reset()
    compiled = compile_forward(runner.model, 3, cache_dir=tmp_path / "cache")
    profiler = TorchProfiler(str(tmp_path), 0, "m", torch.device("cpu"), mark_trace=True)
    ids = torch.arange(5)
    with set_forward_context(ForwardContext(runner.attn_layers, None)), torch.inference_mode():
        compiled(ids, ids)  # compiles outside the trace, as graph capture's first warm-up does
        with profiler.capture_trace(5):
            compiled(ids, ids)
    trace = tmp_path / CAPTURE_TRACES / "bs_5_rank0.json.gz"
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    annotations = {e["name"] for e in events if e.get("cat") == "user_annotation"}
    assert any(name.startswith("## Call CompiledFxGraph") for name in annotations), annotations
    assert "model.layers.1.self_attn.attn" in annotations


def test_tag_modules_counts_and_skips_containers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    outer = torch.nn.Module()
    outer.body = model
    assert tag_modules(outer) == 2  # body is a container: its children are tagged, not it
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        outer.body(torch.ones(1, 2))
    assert {"body.0", "body.1"} <= {e.name for e in prof.events()}


def test_gpu_only_tracing_needs_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ATOM_TORCH_PROFILER_GPU_ONLY=1 drops the CPU activity; on a CPU device there is nothing
    to trace, which start() says rather than writing an empty trace."""
    monkeypatch.setenv("ATOM_TORCH_PROFILER_GPU_ONLY", "1")
    profiler = TorchProfiler(str(tmp_path), 0, "m", torch.device("cpu"), mark_trace=False)
    assert profiler.gpu_only
    with pytest.raises(ValueError, match="needs a CUDA device"):
        profiler.start()
    assert not profiler.running
