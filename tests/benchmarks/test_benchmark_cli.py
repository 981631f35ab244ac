"""Both benchmark CLIs end to end on tiny configs, and the throughput workload equal to the
peer script's."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
import transformers

from atom.benchmarks import benchmark_latency, benchmark_throughput
from atom.benchmarks.benchmark_throughput import workload
from atom.benchmarks.model_cost import model_cost
from atom.benchmarks.model_dirs import benchmark_model_names

# Small engines: eager, a 16 MiB KV cache, on the CPU even where a GPU is present.
ENGINE_FLAGS = ["--load-format", "dummy", "--enforce-eager", "--device", "cpu"]
ENGINE_FLAGS += ["--kv-cache-memory", "16MiB"]
ENV_FIELDS = ("device_name", "torch", "triton", "git_commit", "startup_s", "engine_args")
MOE_MODELS = ("tiny_qwen3_moe", "tiny_deepseek_v2", "tiny_gpt_oss")


def _peer_workload(n: int, max_in: int, max_out: int) -> tuple[list[list[int]], list[int]]:
    """peer_bench.py's workload(), verbatim but for restoring the global generator."""
    state = random.getstate()
    try:
        random.seed(0)
        ids = [
            [random.randint(0, 10000) for _ in range(random.randint(100, max_in))] for _ in range(n)
        ]
        outs = [random.randint(100, max_out) for _ in range(n)]
        return ids, outs
    finally:
        random.setstate(state)


def test_workload_is_the_peers() -> None:
    ids, outs = workload(256, 100, 1024, 100, 1024, seed=0)
    assert (ids, outs) == _peer_workload(256, 1024, 1024)
    # The peer's 18,762 tok/s over 7.14 s: 133,960 planned tokens, to rounding.
    assert sum(map(len, ids)) == 142_827 and sum(outs) == 133_966
    assert workload(8, 100, 300, 100, 200, seed=0) == _peer_workload(8, 300, 200)
    with pytest.raises(ValueError, match="input lengths"):
        workload(4, 100, 32, 1, 8, seed=0)


def test_help_lists_the_benchmark_models() -> None:
    for parser in (
        benchmark_throughput.build_throughput_parser(),
        benchmark_latency.build_latency_parser(),
    ):
        text = parser.format_help()
        assert all(name in text for name in benchmark_model_names())
        assert "--kv-cache-dtype" in text and "--enforce-eager" in text  # every engine flag
    defaults = benchmark_latency.build_latency_parser().parse_args([])
    assert (defaults.model, defaults.load_format, defaults.max_model_len) == (
        "llama-3.1-8b",
        "dummy",
        4096,
    )
    assert defaults.batch_sizes == [1, 8, 32, 128] and defaults.output_lens == [16, 272]
    defaults = benchmark_throughput.build_throughput_parser().parse_args([])
    assert (defaults.model, defaults.num_seqs, defaults.seed) == ("qwen3-0.6b", 256, 0)
    assert (defaults.max_input_len, defaults.max_output_len) == (1024, 1024)


def test_throughput_cli(
    tiny_qwen3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "out" / "throughput.json"
    argv = ["--model", str(tiny_qwen3), *ENGINE_FLAGS, "--num-seqs", "4"]
    argv += ["--min-input-len", "8", "--max-input-len", "32"]
    argv += ["--min-output-len", "2", "--max-output-len", "8", "--output-json", str(out_path)]
    argv += ["--tag", "abc123"]
    record = benchmark_throughput.main(argv)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == record == json.loads(out_path.read_text())
    ids, outs = workload(4, 8, 32, 2, 8, seed=0)
    assert record["seqs"] == 4 and record["prompt_tokens"] == sum(map(len, ids))
    assert record["planned_out"] == record["generated"] == sum(outs)  # ignore_eos
    assert record["seconds"] > 0 and record["tok_per_s"] > 0
    assert record["total_tok_per_s"] > record["output_tok_per_s"] > 0
    assert record["engine"] == "atom" and record["device"] == "cpu" and record["tag"] == "abc123"
    assert record["max_model_len"] == 4096
    assert all(field in record for field in (*ENV_FIELDS, "warmup_s", "total_wall_incl_startup"))
    assert record["copy_GBps"] > 0 and record["matmul_TFLOPs"] > 0
    roofline = record["roofline_prefill_s"] + record["roofline_decode_s"]
    assert record["roofline_s"] == pytest.approx(roofline, abs=2e-6) and roofline > 0  # 3 roundings
    assert 0 <= record["roofline_pct"] < 100  # a tiny model on a CPU: mostly Python


def test_latency_cli(tiny_llama: Path, tmp_path: Path) -> None:
    out_path = tmp_path / "latency.json"
    argv = ["--model", str(tiny_llama), *ENGINE_FLAGS, "--batch-sizes", "1,2"]
    argv += ["--input-len", "16", "--output-lens", "2,6", "--num-iters", "1"]
    record = benchmark_latency.main([*argv, "--output-json", str(out_path)])
    assert json.loads(out_path.read_text()) == record
    assert record["copy_GBps"] > 0 and record["matmul_TFLOPs"] >= 0
    assert record["avg_context_len"] == 16 + 4 and record["kv_dtype_bytes"] == 4  # float32
    assert record["weight_bytes"] > 0 and record["dtype"] == "float32"
    for bs in (1, 2):
        assert isinstance(record[f"bs{bs}_ms_per_step"], float)  # noisy on a CPU: any sign
        kv = bs * 20 * 2 * 2 * 2 * 16 * 4  # ctx, layers, K+V, kv heads, head_dim, float32
        assert record[f"bs{bs}_kv_bytes"] == kv
        for key in ("tok_s", "achieved_GBps", "roofline_pct"):
            assert f"bs{bs}_{key}" in record
    assert all(field in record for field in ENV_FIELDS)


def test_latency_profiles_each_batch(tiny_llama: Path, tmp_path: Path) -> None:
    """With --torch-profiler-dir, one trace per batch size of PROFILE_TOKENS decoded tokens."""
    argv = ["--model", str(tiny_llama), *ENGINE_FLAGS, "--batch-sizes", "1,2"]
    argv += ["--input-len", "16", "--output-lens", "2,4", "--num-iters", "1"]
    benchmark_latency.main([*argv, "--torch-profiler-dir", str(tmp_path / "prof")])
    traces = sorted((tmp_path / "prof" / "rank_0").glob("*.pt.trace.json.gz"))
    assert len(traces) == 2
    for batch, trace in zip((1, 2), traces, strict=True):
        names = [
            e.get("name", "")
            for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
            if e.get("cat") == "user_annotation"
        ]
        decodes = [n for n in names if n.startswith(f"eager_decode[bs={batch} ")]
        assert len(decodes) == benchmark_latency.PROFILE_TOKENS - 1, names[:5]


@pytest.mark.parametrize("fixture", MOE_MODELS)
def test_latency_cli_on_moe(fixture: str, request: pytest.FixtureRequest) -> None:
    """A MoE reads more experts at a larger batch: each batch size records its own weight bytes."""
    model_dir: Path = request.getfixturevalue(fixture)
    argv = ["--model", str(model_dir), *ENGINE_FLAGS, "--batch-sizes", "1,4"]
    record = benchmark_latency.main([*argv, "--input-len", "12", "--output-lens", "2,4"])
    cost = model_cost(transformers.AutoConfig.from_pretrained(model_dir), torch.float32)
    assert record["params_total"] == cost.total_params
    assert record["params_active"] == cost.active_params < cost.total_params
    assert record["weight_bytes"] == cost.max_weight_bytes
    assert record["bs1_weight_bytes"] == cost.weight_bytes(1) < record["bs4_weight_bytes"]
    assert record["bs4_weight_bytes"] == cost.weight_bytes(4) < record["weight_bytes"]
    assert record["bs4_kv_bytes"] == round(4 * cost.kv_bytes([15], 4)) > 0
    assert all(f"bs{bs}_roofline_pct" in record for bs in (1, 4))


@pytest.mark.parametrize("fixture", MOE_MODELS)
def test_throughput_cli_on_moe(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    argv = ["--model", str(model_dir), *ENGINE_FLAGS, "--num-seqs", "3"]
    argv += ["--min-input-len", "8", "--max-input-len", "24"]
    argv += ["--min-output-len", "2", "--max-output-len", "6"]
    record = benchmark_throughput.main(argv)
    assert record["planned_out"] == record["generated"]
    assert record["roofline_decode_s"] > 0 and record["roofline_prefill_s"] > 0
    assert 0 <= record["roofline_pct"] < 100


def test_latency_rejects_bad_lengths(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="output-lens"):
        benchmark_latency.main(["--model", str(tiny_llama), "--output-lens", "8,8"])


def test_throughput_profiles_a_second_run(tiny_qwen3: Path, tmp_path: Path) -> None:
    """With --torch-profiler-dir the workload runs again under the profiler: one trace, labelled
    steps of the same workload (its prompts computed again, not prefix-cache hits)."""
    argv = ["--model", str(tiny_qwen3), *ENGINE_FLAGS, "--num-seqs", "2"]
    argv += ["--min-input-len", "8", "--max-input-len", "16"]
    argv += ["--min-output-len", "3", "--max-output-len", "3"]
    argv += ["--torch-profiler-dir", str(tmp_path / "prof"), "--mark-trace"]
    record = benchmark_throughput.main(argv)
    assert record["generated"] == 6
    (trace,) = (tmp_path / "prof" / "rank_0").glob("*.pt.trace.json.gz")
    names = {
        e.get("name", "") for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    }
    (prefill,) = (n for n in names if n.startswith("prefill[bs="))
    assert f"tok={record['prompt_tokens']} " in prefill  # prefix cache reset: every prompt token
    assert any("decode[bs=2" in n for n in names)
