"""What the benchmark CLIs share: the engine flags with benchmark defaults, engine start-up,
the environment record (card, versions, commit) and the one-JSON-line result."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from atom.args import EngineArgs, FlexibleArgumentParser
from atom.benchmarks.model_dirs import benchmark_model_names, resolve_benchmark_model

_REPO_DIR = Path(__file__).resolve().parents[2]


def build_parser(description: str | None, **engine_defaults: Any) -> argparse.ArgumentParser:
    """Every engine flag, `engine_defaults` (model, load_format, ...) replacing the engine's."""
    names = ", ".join(benchmark_model_names())
    parser = FlexibleArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"benchmark models for --model (real config.json, random weights with "
        f"--load-format dummy, a stand-in tokenizer): {names}",
    )
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(**engine_defaults)
    # The engine's help names its own default model; say what this CLI does instead.
    model_action = parser._option_string_actions["--model"]
    model_action.help = (
        f"a benchmark model ({names}), an HF directory, .gguf file or cached hub id "
        f"(default: {engine_defaults.get('model')})"
    )
    parser.add_argument("--output-json", default=None, help="also write the JSON record here")
    parser.add_argument(
        "--tag",
        default=None,
        help="free text kept in the JSON record, e.g. the commit when the run's checkout has none",
    )
    return parser


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    engine_args = EngineArgs.from_cli_args(args)
    return engine_args.replace(model=resolve_benchmark_model(engine_args.model))


def start_engine(engine_args: EngineArgs) -> tuple[Any, float]:
    """The LLM and the seconds its construction took (load, profile, KV allocation, compile)."""
    from atom import LLM

    start = time.perf_counter()
    llm = LLM(**dataclasses.asdict(engine_args))
    return llm, time.perf_counter() - start


def engine_record(
    llm: Any, engine_args: EngineArgs, model_name: str | None, tag: str | None = None
) -> dict[str, Any]:
    """The engine settings a result depends on: resolved dtype and device, KV blocks, the flags."""
    config = llm.config
    return {
        "engine": "atom",
        "model": model_name,
        "tag": tag,
        "dtype": config.model.dtype,
        "device": config.device,
        "max_model_len": config.model.max_model_len,
        "kv_cache_blocks": getattr(llm.engine, "num_kv_blocks", None),
        "engine_args": dataclasses.asdict(engine_args),
    }


def environment_info(device: str) -> dict[str, Any]:
    import torch

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    if device == "cuda":
        card = torch.cuda.get_device_name()
    else:
        card = platform.processor() or platform.machine() or "cpu"
    return {
        "device_name": card,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from, `-dirty` when it has local changes."""
    try:
        head = _git("rev-parse", "HEAD")
        return head + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None  # no git, or not a checkout (a copied tree)


def emit(record: dict[str, Any], output_json: str | None) -> None:
    """One JSON line on stdout (what the peer scripts print) and, if asked, a file."""
    line = json.dumps(record)
    print(line, flush=True)
    if output_json:
        path = Path(output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=_REPO_DIR, capture_output=True, text=True, timeout=10, check=True
    )
    return out.stdout.strip()
