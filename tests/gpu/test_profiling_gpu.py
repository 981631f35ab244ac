"""Traces of a CUDA run: capture traces per graph, replayed kernels mapped back to modules, GPU
busy time (run by benchmarks/gpu_run.sh on the GPU machine; skipped elsewhere)."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from atom import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOOLS = Path(__file__).resolve().parents[2] / "tools"
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


@pytest.fixture(scope="module")
def checkpoint(save_random_model: Callable[[Any], Path]) -> Path:
    return save_random_model(
        transformers.LlamaConfig(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=1000,
            max_position_embeddings=512,
        )
    )


def _tool(script: str, *args: object) -> str:
    cmd = [sys.executable, str(TOOLS / script), *map(str, args)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout


def _engine(checkpoint: Path, prof: Path, **kwargs: Any) -> LLM:
    """Graphs of 1, 2 and 4 rows, traces to `prof`."""
    return LLM(
        str(checkpoint),
        skip_tokenizer_init=True,
        cudagraph_capture_sizes=[1, 2, 4],
        max_num_seqs=4,
        kv_cache_memory_bytes=256 << 20,
        torch_profiler_dir=str(prof),
        **kwargs,
    )


def _traced_generate(llm: LLM, checkpoint: Path, prof: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Three prompts (5, 9 and 17 tokens) x 8 tokens under the profiler, then shutdown: the run
    trace and its events."""
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 9, 17)]
    llm.start_profile()
    llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    llm.stop_profile()
    llm.shutdown()
    (trace,) = (prof / "rank_0").glob(f"{checkpoint.name}_ts_*.pt.trace.json.gz")
    return trace, json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]


def _decode_gpu_time(events: list[dict[str, Any]]) -> float:
    """The GPU time launched inside decode[...] ranges, by correlation id, by brute force."""
    decodes = [
        e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("decode[")
    ]
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    total = 0.0
    for g in (e for e in events if e.get("cat") in GPU_CATS):
        launch = launches.get(g["args"].get("correlation"))
        if launch is not None and any(
            d["tid"] == launch["tid"] and d["ts"] <= launch["ts"] <= d["ts"] + d["dur"]
            for d in decodes
        ):
            total += g["dur"]
    return total


@pytest.mark.parametrize("level", [0, 3])
def test_graph_replays_map_to_modules(
    checkpoint: Path, tmp_path: Path, level: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ATOM_TORCH_PROFILER_GPU_ONLY", raising=False)  # CPU ranges wanted
    prof = tmp_path / "prof"
    llm = _engine(checkpoint, prof, level=level, mark_trace=True)
    captures = sorted(p.name for p in (prof / "capture_traces").iterdir())
    assert captures == ["bs_1_rank0.json.gz", "bs_2_rank0.json.gz", "bs_4_rank0.json.gz"]
    trace, events = _traced_generate(llm, checkpoint, prof)
    labels = {e["name"] for e in events if e.get("cat") == "user_annotation"}
    assert "prefill[bs=3 tok=31 ctx=[5, 9, 17]]" in labels
    assert "decode[bs=3/4 tok=3]" in labels

    _tool("parse_trace.py", trace, "--output", tmp_path / "b.csv")
    with (tmp_path / "b.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["phase"] == "decode"]
    modules = {r["module"] for r in rows}
    assert not modules & {"(unmatched)", "(graph replay)"}, modules
    assert {r["layer"] for r in rows} >= {"0", "1", "avg"}
    assert "self_attn.attn" in modules and "compute_logits" in modules and "sampler" in modules
    if level == 0:
        # the qkv projection runs in the attention op (fused at decode); o_proj's and
        # down_proj's tags hold the norm after them (forward_add_norm)
        want = {"self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj", "input_layernorm"}
        assert want <= modules, modules
    else:
        assert "(compiled)" in modules
    total = sum(float(r["total_us"]) for r in rows if r["layer"] != "avg")
    assert total == pytest.approx(_decode_gpu_time(events), rel=1e-4)

    summary = _tool("analyze_trace_summary.py", trace)
    assert "Mean GPU idle:" in summary and "| decode | 3 | 4 |" in summary
    assert "no GPU events" not in summary


def test_gpu_only_trace_splits_at_sampled_copies(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ATOM_TORCH_PROFILER_GPU_ONLY=1: no CPU ops or ranges in the trace, and the tools find one
    step per engine step (each ends with its sampled ids' copy) with the batch from its bytes."""
    monkeypatch.setenv("ATOM_TORCH_PROFILER_GPU_ONLY", "1")
    prof = tmp_path / "prof"
    trace, events = _traced_generate(_engine(checkpoint, prof), checkpoint, prof)
    cats = {e.get("cat") for e in events}
    assert "cpu_op" not in cats and "user_annotation" not in cats and "kernel" in cats
    summary = _tool("analyze_trace_summary.py", trace)
    assert "A GPU-only trace" in summary
    # One prefill of the 3 prompts, then 7 decode steps of 3 rows: 8 steps of 3 sampled ids.
    assert "Steps: 8 step;" in summary and "| step | 3 | - | 8 |" in summary
