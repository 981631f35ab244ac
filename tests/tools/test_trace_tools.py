"""tools/parse_trace.py and tools/analyze_trace_summary.py, run as scripts.

A real trace recorded on the CPU with a tiny random Llama checks the labels and that every number
equals a sum taken straight from the trace's events; a hand-made GPU trace (synthetic_trace.py)
checks what needs a GPU to record: graph replays mapped through a capture trace, launches
correlated to kernels, device-side ranges, GPU busy time.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import openpyxl
import pytest
import torch
import transformers
from synthetic_trace import (
    TraceBuilder,
    blocked_trace,
    capture_trace,
    gpu_only_trace,
    overlapping_trace,
    run_trace,
)

from atom import LLM, SamplingParams

TOOLS = Path(__file__).resolve().parents[2] / "tools"
PROMPTS = [{"prompt_token_ids": [3, 4, 5, 6, 7]}, {"prompt_token_ids": [8, 9, 10]}]
STEPS = [
    "prefill[bs=2 tok=8 ctx=[5, 3]]",
    "eager_decode[bs=2 tok=2 ctx=[6, 4]]",
    "eager_decode[bs=2 tok=2 ctx=[7, 5]]",
    "eager_decode[bs=2 tok=2 ctx=[8, 6]]",
]


def run_tool(script: str, *args: object) -> str:
    cmd = [sys.executable, str(TOOLS / script), *map(str, args)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def load(path: Path) -> list[dict[str, Any]]:
    return json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]


def fmt_us(us: float) -> str:
    return f"{us / 1000:.3f} ms" if us >= 1000 else f"{us:.1f} us"


def inside(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return b["ts"] <= a["ts"] and a["ts"] + a["dur"] <= b["ts"] + b["dur"]


# ---- a real CPU trace ----
@pytest.fixture(scope="module")
def cpu_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("profile")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp / "tiny")
    llm = LLM(
        str(tmp / "tiny"),
        skip_tokenizer_init=True,
        kv_cache_memory_bytes=4 << 20,
        torch_profiler_dir=str(tmp / "prof"),
        mark_trace=True,
    )
    llm.start_profile()
    llm.generate(PROMPTS, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.stop_profile()
    llm.shutdown()
    (trace,) = (tmp / "prof" / "rank_0").glob("tiny_ts_*.pt.trace.json.gz")
    return trace


def expected_cpu_totals(events: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[float]]:
    """(phase, innermost tag, op) -> [calls, total us] over the top-level ops of each step,
    found by brute force."""
    annotations = [e for e in events if e.get("cat") == "user_annotation"]
    tags = [a for a in annotations if "[" not in a["name"]]
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    totals: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for step in (a for a in annotations if a["name"] in STEPS):
        mine = [op for op in ops if inside(op, step)]
        for op in mine:
            if any(
                o is not op and inside(op, o) and (o["dur"], -o["ts"]) > (op["dur"], -op["ts"])
                for o in mine
            ):
                continue  # inside another op
            around = [t for t in tags if t["ts"] <= op["ts"] <= t["ts"] + t["dur"]]
            tag = min(around, key=lambda t: t["dur"])["name"] if around else ""
            entry = totals[(step["name"].split("[")[0], tag, op["name"])]
            entry[0] += 1
            entry[1] += op["dur"]
    return totals


def row_tag(row: dict[str, str]) -> str:
    if row["layer"] == "":
        return "" if row["module"] == "(untagged)" else row["module"]
    module = "" if row["module"] == "(layer)" else "." + row["module"]
    return f"model.layers.{row['layer']}{module}"


def test_cpu_trace_labels_and_tags(cpu_trace: Path) -> None:
    names = [e["name"] for e in load(cpu_trace) if e.get("cat") == "user_annotation"]
    assert [n for n in names if "[" in n] == STEPS
    for layer in (0, 1):
        for module in ("", ".self_attn.qkv_proj", ".self_attn.attn", ".mlp.down_proj"):
            assert names.count(f"model.layers.{layer}{module}") == len(STEPS)
    assert names.count("sampler") == len(STEPS)


def test_parse_trace_matches_cpu_events(cpu_trace: Path, tmp_path: Path) -> None:
    out = run_tool("parse_trace.py", cpu_trace, "--output", tmp_path / "b.csv")
    assert "CPU trace" in out and "## prefill: 1 steps" in out and "## eager_decode: 3 steps" in out
    rows = read_csv(tmp_path / "b.csv")
    got = {
        (r["phase"], row_tag(r), r["kernel"]): (int(r["calls"]), float(r["total_us"]))
        for r in rows
        if r["layer"] != "avg"
    }
    expected = expected_cpu_totals(load(cpu_trace))
    assert got.keys() == expected.keys()
    for key, (calls, total) in expected.items():
        assert got[key][0] == calls, key
        assert got[key][1] == pytest.approx(total, abs=2e-3), key
    # layer 0 and 1 both hold the QKV projection's linear: its average is theirs
    qkv = [r for r in rows if r["module"] == "self_attn.qkv_proj" and r["phase"] == "eager_decode"]
    (avg,) = [r for r in qkv if r["layer"] == "avg"]
    assert float(avg["total_us"]) == pytest.approx(
        sum(float(r["total_us"]) for r in qkv if r["layer"] != "avg") / 2, abs=2e-3
    )


def test_parse_trace_layer_and_xlsx(cpu_trace: Path, tmp_path: Path) -> None:
    run_tool("parse_trace.py", cpu_trace, "--layer", 1, "--output", tmp_path / "l1.csv")
    rows = read_csv(tmp_path / "l1.csv")
    assert rows and {r["layer"] for r in rows} == {"1"}
    assert {r["phase"] for r in rows} == {"prefill", "eager_decode"}
    run_tool("parse_trace.py", cpu_trace, "--output", tmp_path / "b.xlsx")
    run_tool("parse_trace.py", cpu_trace, "--output", tmp_path / "b.csv")
    book = openpyxl.load_workbook(tmp_path / "b.xlsx")
    assert book.sheetnames == ["prefill", "eager_decode"]
    all_rows = read_csv(tmp_path / "b.csv")
    for sheet in book.worksheets:
        values = list(sheet.iter_rows(values_only=True))
        assert list(values[0]) == list(all_rows[0].keys())
        assert len(values) - 1 == sum(r["phase"] == sheet.title for r in all_rows)


def test_summary_of_cpu_trace(cpu_trace: Path, tmp_path: Path) -> None:
    run_tool("analyze_trace_summary.py", cpu_trace, "--output", tmp_path / "summary.md")
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("# Trace Performance Summary")
    steps = {e["name"]: e["dur"] for e in load(cpu_trace) if e.get("name") in STEPS}
    assert f"| 0 | `{STEPS[0]}` | {fmt_us(steps[STEPS[0]])} |" in text
    decode = [steps[s] for s in STEPS[1:]]
    mean = fmt_us(sum(decode) / 3)
    assert f"| host | 3 | {mean} | {fmt_us(min(decode))} | {fmt_us(max(decode))} |" in text
    assert "no GPU events" in text and "GPU busy: no GPU events" in text
    for i, step in enumerate(STEPS[1:]):
        assert f"| {i} | `{step}` | {fmt_us(steps[step])} |" in text


# ---- a hand-made GPU trace ----
@pytest.fixture
def gpu_trace(tmp_path: Path) -> Path:
    capture_trace(tmp_path / "prof" / "capture_traces" / "bs_4_rank0.json.gz")
    return run_trace(tmp_path / "prof" / "rank_0" / "m_ts_1.pt.trace.json.gz")


def breakdown(
    trace: Path, tmp_path: Path, *args: object
) -> dict[tuple[str, str, str, str], tuple[float, float]]:
    run_tool("parse_trace.py", trace, "--output", tmp_path / "out.csv", *args)
    return {
        (r["phase"], r["layer"], r["module"], r["kernel"]): (
            float(r["calls"]),
            float(r["total_us"]),
        )
        for r in read_csv(tmp_path / "out.csv")
    }


def test_gpu_breakdown_maps_replays_through_the_capture_trace(
    gpu_trace: Path, tmp_path: Path
) -> None:
    rows = breakdown(gpu_trace, tmp_path)
    assert rows == {
        # eager prefill: the tags around each launch (runtime or driver API)
        ("prefill", "0", "self_attn.qkv_proj", "gemm_a"): (1, 30),
        ("prefill", "0", "self_attn.attn", "attn_kernel"): (1, 20),
        ("prefill", "1", "self_attn.qkv_proj", "gemm_a"): (1, 30),
        ("prefill", "1", "self_attn.attn", "attn_kernel"): (1, 20),
        ("prefill", "", "sampler", "Memcpy DtoH"): (1, 5),
        ("prefill", "1", "mlp", "orphan_kernel"): (1, 4),  # no launch: device-side ranges
        ("prefill", "avg", "self_attn.qkv_proj", "gemm_a"): (1, 30),
        ("prefill", "avg", "self_attn.attn", "attn_kernel"): (1, 20),
        ("prefill", "avg", "mlp", "orphan_kernel"): (0.5, 2),  # a layer without it counts 0
        # two graph replays: kernels matched in order to the capture's
        ("decode", "0", "self_attn.qkv_proj", "gemm_a"): (2, 20),
        ("decode", "0", "self_attn.attn", "attn_kernel"): (2, 16),
        ("decode", "0", "(compiled)", "triton_poi_fused_add"): (2, 6),
        ("decode", "1", "self_attn.qkv_proj", "gemm_a"): (2, 20),
        ("decode", "1", "self_attn.attn", "attn_kernel"): (2, 16),
        ("decode", "", "(unmatched)", "memset_x"): (1, 2),
        ("decode", "", "compute_logits", "gemm_logits"): (2, 10),
        ("decode", "avg", "self_attn.qkv_proj", "gemm_a"): (2, 20),
        ("decode", "avg", "self_attn.attn", "attn_kernel"): (2, 16),
        ("decode", "avg", "(compiled)", "triton_poi_fused_add"): (1, 3),
    }
    (decode_gemm,) = [
        r
        for r in read_csv(tmp_path / "out.csv")
        if r["phase"] == "decode" and r["layer"] == "0" and r["kernel"] == "gemm_a"
    ]
    assert float(decode_gemm["per_step_us"]) == 10
    assert float(decode_gemm["pct_of_layer"]) == pytest.approx(100 * 20 / 42, abs=1e-3)
    assert float(decode_gemm["pct_of_step"]) == pytest.approx(100 * 20 / 90, abs=1e-3)


def test_capture_trace_given_or_missing(gpu_trace: Path, tmp_path: Path) -> None:
    alone = tmp_path / "alone" / "run.json.gz"
    alone.parent.mkdir()
    shutil.copy(gpu_trace, alone)
    out = run_tool("parse_trace.py", alone)
    assert "no capture trace for the graph of bs=4" in out
    rows = breakdown(alone, tmp_path)
    assert rows[("decode", "", "(graph replay)", "gemm_a")] == (4, 40)
    given = gpu_trace.parents[1] / "capture_traces" / "bs_4_rank0.json.gz"
    rows = breakdown(alone, tmp_path, "--capture-trace", given)
    assert rows[("decode", "1", "self_attn.attn", "attn_kernel")] == (2, 16)


def gpu_busy(events: list[dict[str, Any]], lo: float, hi: float) -> float:
    """Brute force: the time in [lo, hi) covered by any GPU event, on a 0.5 us grid."""
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    ticks = [lo + 0.5 * i for i in range(int((hi - lo) * 2))]
    busy = sum(any(e["ts"] <= t < e["ts"] + e["dur"] for e in gpu) for t in ticks)
    return 100 * busy / len(ticks)


def test_summary_gpu_busy(gpu_trace: Path, tmp_path: Path) -> None:
    events = json.loads(gzip.decompress(gpu_trace.read_bytes()))["traceEvents"]
    run_tool("analyze_trace_summary.py", gpu_trace, "--output", tmp_path / "s.md")
    text = (tmp_path / "s.md").read_text()
    # a step starts at its first GPU work and ends where the next starts (the last: its end)
    prefill = gpu_busy(events, 200, 500)
    first, second = gpu_busy(events, 500, 600), gpu_busy(events, 600, 659)
    assert (
        f"| 0 | `prefill[bs=1 tok=4 ctx=4]` | 100.0 us | 134.0 us | 300.0 us | {prefill:.1f}% |"
        in text
    )
    assert f"| 0 | `decode[bs=3/4 tok=3]` | 100.0 us | - | 100.0 us | - | {first:.1f}% |" in text
    assert f"| 1 | `decode[bs=3/4 tok=3]` | 59.0 us | - | 59.0 us | - | {second:.1f}% |" in text
    idle = [100 - first, 100 - second]
    assert (
        f"**Mean GPU idle: {sum(idle) / 2:.1f}%** of the decode period; max {max(idle):.1f}%"
        in text
    )
    assert "2 of 2 steps idle more than 10%" in text
    # host busy: from one decode's host start (400) to the next's (460), less a 10 us wait
    assert "| host busy | 1 | 50.0 us | 50.0 us | 50.0 us | 50.0 us |" in text
    assert re.search(r"\| decode \| 3 \| 4 \| 2 \| 79\.5 us \|.*\| 50\.0 us \|", text)
    assert "no GPU events" not in text


def test_gpu_only_trace_steps_end_at_sampled_copies(tmp_path: Path) -> None:
    """No host ranges: steps end with their device-to-host copies, rows = bytes / 8; a step owns
    the GPU time from the previous copy on (here an upload at 39 starts the second step)."""
    trace = gpu_only_trace(tmp_path / "g.json.gz")
    run_tool("analyze_trace_summary.py", trace, "--output", tmp_path / "s.md")
    text = (tmp_path / "s.md").read_text()
    assert "A GPU-only trace" in text and "| host |" not in text
    # step 1: 0 to 39 (the next step's first work), busy 10 + 8 + 1; step 2: 39 to 52, 1 + 10 + 1
    first, second = 100 - 100 * 19 / 39, 100 - 100 * 12 / 13
    assert f"| step | 3 | - | 1 | 39.0 us | 39.0 us | 39.0 us | {first:.1f}% | - |" in text
    assert f"| step | 4 | - | 1 | 13.0 us | 13.0 us | 13.0 us | {second:.1f}% | - |" in text
    assert "1 of 2 steps idle more than 10%" in text
    # the idle step's longest gap: its sampled ids' copy (21-22) to the next step's upload (39)
    assert (
        f"| 0 | step | 3 | 39.0 us | {first:.1f}% | 17.0 us | `Memcpy DtoH (Device -> Pinned)` | "
        "`Memcpy HtoD (Pinned -> Device)` |" in text
    )
    out = run_tool("parse_trace.py", trace, "--output", tmp_path / "b.csv")
    assert "## step: 2 steps" in out
    rows = read_csv(tmp_path / "b.csv")
    assert {r["kernel"] for r in rows if r["phase"] == "step"} >= {"gemm_a", "attn_kernel"}


def test_exclusive_time_of_overlapping_kernels(tmp_path: Path) -> None:
    """Durations overlap (23 us of kernels and copies over 18 us of busy GPU); exclusive times add
    up to the busy time: gemm_a 10 + 5, attn_kernel 2 (past gemm_a's end), the copy 1."""
    trace = overlapping_trace(tmp_path / "o.json.gz")
    out = run_tool("parse_trace.py", trace, "--output", tmp_path / "b.csv")
    assert "1 steps, 23.0 us of kernels per step (18.0 us exclusive)" in out
    rows = {r["kernel"]: r for r in read_csv(tmp_path / "b.csv") if r["phase"] == "step"}
    assert float(rows["gemm_a"]["per_step_us"]) == 15.0
    assert float(rows["gemm_a"]["exclusive_per_step_us"]) == 15.0
    assert float(rows["attn_kernel"]["per_step_us"]) == 7.0
    assert float(rows["attn_kernel"]["exclusive_per_step_us"]) == 2.0


def test_unlabelled_cpu_and_gpu_trace_is_not_gpu_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host ops without step labels (a trace of something other than the engine's steps): no
    steps are made up from its copies."""
    monkeypatch.syspath_prepend(str(TOOLS))
    from trace_events import Trace

    events = load(gpu_only_trace(tmp_path / "g.json.gz"))
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1,
                   "ts": 0, "dur": 5, "args": {}})  # fmt: skip
    trace = Trace(events)
    assert not trace.gpu_only and trace.steps == []
    assert len(Trace(load(tmp_path / "g.json.gz")).steps) == 2


def blocked_rows(text: str) -> list[str]:
    """The rows of the summary's list of the longest host calls into CUDA."""
    section = text.split("## Host calls into CUDA")[1].split("\n## ")[0]
    table = section.split("| step | kind | call | duration | inside |\n|---|---|---|---|---|\n")[1]
    return [line for line in table.splitlines() if line.startswith("| ")]


def test_summary_lists_host_calls_that_blocked(tmp_path: Path) -> None:
    """Calls into CUDA of over a millisecond, longest first, with their step and the innermost op
    or module tag around them; short launches are left out."""
    trace = blocked_trace(tmp_path / "b.json.gz")
    run_tool("analyze_trace_summary.py", trace, "--output", tmp_path / "s.md")
    text = (tmp_path / "s.md").read_text()
    assert "## Host calls into CUDA over 1.000 ms" in text
    assert "3 calls, 6.500 ms in all" in text
    assert "| `cudaLaunchKernel` | 1 | 3.000 ms | 3.000 ms |" in text
    rows = blocked_rows(text)
    assert rows == [
        "| 0 | prefill | `cudaLaunchKernel` | 3.000 ms | `aten::mm` |",
        "| - | - | `cudaMemcpyAsync` | 2.000 ms | `` |",
        "| 1 | decode | `cudaEventSynchronize` | 1.500 ms | `` |",
    ]


def test_blocked_calls_of_one_name_do_not_crowd_out_the_rest(tmp_path: Path) -> None:
    """Many per-step waits longer than one launch that blocked: all counted by name, at most
    BLOCK_PER_CALL of them listed, and the launch still listed."""
    t = TraceBuilder()
    t.host("prefill[bs=1 tok=4 ctx=4]", 0, 3000)
    t.gpu("gemm_a", 100, 500, t.launch("cudaLaunchKernel", 50, dur=1200))
    for i in range(40):
        start = 4000 + 3000 * i
        t.host("decode[bs=1/1 tok=1]", start, 2900)
        t.kernel("gemm_b", start + 10, start + 20, 100)
        t.sync(start + 100, 2000 + i)
    run_tool("analyze_trace_summary.py", t.write(tmp_path / "w.json.gz"), "--output",
             tmp_path / "s.md")  # fmt: skip
    text = (tmp_path / "s.md").read_text()
    assert "| `cudaEventSynchronize` | 40 | 80.780 ms | 2.039 ms |" in text
    rows = blocked_rows(text)
    assert len(rows) == 6 and rows[-1] == "| 0 | prefill | `cudaLaunchKernel` | 1.200 ms | `` |"
