"""Online serving benchmark, vLLM's client: `python -m atom.benchmarks.benchmark_serving`.

Sends streamed requests to any OpenAI-compatible server (ours, vLLM, SGLang, ...) and prints vLLM's
result table; `--save-result` writes vLLM's JSON fields, so that results compare with theirs:

    python -m atom.entrypoints.openai_server --model M &
    python -m atom.benchmarks.benchmark_serving --model M --dataset-name random \\
        --random-input-len 1024 --random-output-len 1024 --random-range-ratio 0.8 \\
        --num-prompts 40 --max-concurrency 4 --request-rate inf --ignore-eos \\
        --save-result --result-dir results

Warm-up requests (the first prompt) go first, untimed; then the timed run sends every request at
--request-rate (inf: all at once; else Poisson, or gamma arrivals with --burstiness), at most
--max-concurrency in flight. Failed requests are counted and listed with their errors; the exit
status is 1 when every request failed. Metric definitions: serving_client.py, serving_metrics.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from atom.args import FlexibleArgumentParser
from atom.benchmarks.serving_client import (
    BACKENDS,
    CHAT_BACKENDS,
    ClientConfig,
    RequestResult,
    default_endpoint,
)
from atom.benchmarks.serving_datasets import (
    CUSTOM_SCHEMA,
    BenchmarkRequest,
    sample_custom,
    sample_random,
    sample_sharegpt,
)
from atom.benchmarks.serving_metrics import (
    PERCENTILE_METRICS,
    BenchmarkMetrics,
    calculate_metrics,
    format_table,
    parse_slo,
    result_fields,
)
from atom.benchmarks.serving_runner import run_requests

DATASETS = ("random", "sharegpt", "custom")
# The fields the benchmark itself writes: --metadata may not reuse their names.
OWN_FIELDS = frozenset(
    {
        *("date", "backend", "model_id", "tokenizer_id", "num_prompts", "dataset_name"),
        *("dataset_path", "random_input_len", "random_output_len", "random_range_ratio"),
        *("random_prefix_len", "request_rate", "burstiness", "max_concurrency", "duration"),
        *("completed", "failed", "total_input_tokens", "total_output_tokens", "concurrency"),
        *("request_throughput", "request_goodput", "output_throughput", "total_token_throughput"),
        *("errors_summary", "input_lens", "output_lens", "ttfts", "itls", "e2els"),
        *("generated_texts", "errors"),
    }
)
STATS_FIELD = re.compile(r"(mean|median|std|p[0-9.]+)_(ttft|tpot|itl|e2el)_ms")
# Default --request-timeout: vLLM's 6 hours.
REQUEST_TIMEOUT_S = 6 * 60 * 60


def build_parser() -> argparse.ArgumentParser:
    parser = FlexibleArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = parser.add_argument
    a("--backend", default="vllm", choices=BACKENDS, help="openai-chat: chat, else: completions")
    a("--base-url", default=None, help="server URL, e.g. http://10.0.0.2:8000 (else --host/--port)")
    a("--host", default="127.0.0.1")
    a("--port", type=int, default=8000)
    a("--endpoint", default=None, help="default: /v1/completions, /v1/chat/completions for chat")
    a("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    a("--model", required=True, help="the model's name or path (also the default tokenizer)")
    a("--served-model-name", default=None, help="the name sent as 'model' (default: --model)")
    a("--tokenizer", default=None, help="an HF tokenizer folder or hub id (default: --model)")
    a("--trust-remote-code", action="store_true", help="let the tokenizer run its own code")
    a("--dataset-name", default="random", choices=DATASETS)
    path_help = f"sharegpt: a ShareGPT JSON file; custom: a JSONL file with {CUSTOM_SCHEMA}"
    a("--dataset-path", default=None, help=path_help)
    a("--random-input-len", type=int, default=1024, help="tokens after the shared prefix")
    a("--random-output-len", type=int, default=128)
    a("--random-range-ratio", type=float, default=1.0, help="lengths: U[len * ratio, len]")
    a("--random-prefix-len", type=int, default=0, help="tokens of a prefix shared by all prompts")
    a("--sharegpt-output-len", type=int, default=None, help="replaces the reference lengths")
    a("--custom-output-len", type=int, default=None, help="custom: overrides output_tokens")
    a("--num-prompts", type=int, default=1000)
    a("--max-concurrency", type=int, default=None, help="requests in flight at most")
    a("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    a("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals (1: Poisson)")
    a("--ignore-eos", action="store_true", help="send ignore_eos (vLLM, SGLang and ATOM know it)")
    a("--logprobs", type=int, default=None, help="ask for this many logprobs per token")
    a("--num-warmups", type=int, default=1, help="untimed requests of the first prompt")
    a("--seed", type=int, default=0)
    a("--request-timeout", type=float, default=REQUEST_TIMEOUT_S, help="seconds per request")
    a("--percentile-metrics", default="ttft,tpot,itl", help="of ttft,tpot,itl,e2el")
    a("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99,99.9")
    slo_help = "SLOs of a good request (ttft, tpot, e2el in ms), e.g. ttft:500 tpot:50"
    a("--goodput", nargs="+", type=parse_slo, default=None, metavar="NAME:MS", help=slo_help)
    a("--save-result", action="store_true", help="write the JSON record")
    a("--save-detailed", action="store_true", help="with the per-request arrays")
    a("--result-dir", default=None, help="where the JSON goes (default: the current folder)")
    name_help = "default: BACKEND-RATEqps[-concurrencyC]-MODEL-DATE.json"
    a("--result-filename", default=None, help=name_help)
    meta_help = "top-level fields of the JSON record, e.g. engine=atom gpu=H200 num_gpus=1"
    a("--metadata", nargs="*", default=None, metavar="KEY=VALUE", help=meta_help)
    a("--profile", action="store_true", help="POST /start_profile before, /stop_profile after")
    a("--disable-tqdm", action="store_true")
    return parser


def parse_metadata(items: Sequence[str] | None) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--metadata {item!r}: expected KEY=VALUE")
        if key in OWN_FIELDS or STATS_FIELD.fullmatch(key):
            raise ValueError(f"--metadata {key!r}: the benchmark writes that field itself")
        metadata[key] = value.strip()
    return metadata


def check_args(args: argparse.Namespace) -> tuple[list[str], list[float]]:
    """Bad values raise ValueError before anything is sent; returns the selected metrics and
    percentiles."""
    selected = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    if not selected or any(m not in PERCENTILE_METRICS for m in selected):
        raise ValueError(
            f"--percentile-metrics {args.percentile_metrics!r}: use {PERCENTILE_METRICS}"
        )
    try:
        percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    except ValueError:
        percentiles = [float("nan")]
    if not all(0 <= p <= 100 for p in percentiles):
        raise ValueError(f"--metric-percentiles {args.metric_percentiles!r}: numbers in [0, 100]")
    for name, ok in (
        ("--num-prompts", args.num_prompts >= 1),
        ("--max-concurrency", args.max_concurrency is None or args.max_concurrency >= 1),
        ("--request-rate", args.request_rate > 0),
        ("--burstiness", args.burstiness > 0),
        ("--num-warmups", args.num_warmups >= 0),
        ("--request-timeout", args.request_timeout > 0),
    ):
        if not ok:
            raise ValueError(f"{name} {getattr(args, name[2:].replace('-', '_'))} is out of range")
    if args.dataset_name != "random" and not args.dataset_path:
        raise ValueError(f"--dataset-name {args.dataset_name} needs --dataset-path")
    return selected, percentiles


def sample_requests(
    args: argparse.Namespace, tokenizer: Any, rng: np.random.RandomState
) -> list[BenchmarkRequest]:
    if args.dataset_name == "sharegpt":
        return sample_sharegpt(
            args.dataset_path, tokenizer, args.num_prompts, args.sharegpt_output_len, args.seed
        )
    if args.dataset_name == "custom":
        return sample_custom(args.dataset_path, tokenizer, args.num_prompts, args.custom_output_len)
    return sample_random(
        tokenizer,
        args.num_prompts,
        args.random_input_len,
        args.random_output_len,
        args.random_range_ratio,
        args.random_prefix_len,
        rng,
    )


def load_tokenizer(name: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    from atom.benchmarks.model_dirs import resolve_benchmark_model

    path = resolve_benchmark_model(name) or name  # our benchmark model names work too
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def urls(args: argparse.Namespace) -> tuple[str, str]:
    """(base URL, request URL)."""
    base = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    return base, base + (args.endpoint or default_endpoint(args.backend))


def build_record(
    args: argparse.Namespace,
    tokenizer_id: str,
    requests: Sequence[BenchmarkRequest],
    results: Sequence[RequestResult],
    metrics: BenchmarkMetrics,
    duration: float,
    selected: Sequence[str],
) -> dict[str, Any]:
    """vLLM's JSON record: setup, --metadata, traffic, results (and the arrays if detailed)."""
    record: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": args.backend,
        "model_id": args.model,
        "tokenizer_id": tokenizer_id,
        "num_prompts": len(requests),
        "dataset_name": args.dataset_name,
    }
    if args.dataset_name == "random":
        record["random_input_len"] = args.random_input_len
        record["random_output_len"] = args.random_output_len
        record["random_range_ratio"] = args.random_range_ratio
        record["random_prefix_len"] = args.random_prefix_len
    else:
        record["dataset_path"] = args.dataset_path
    record |= parse_metadata(args.metadata)
    rate = args.request_rate
    record |= {"request_rate": rate if rate != float("inf") else "inf"}
    record |= {"burstiness": args.burstiness, "max_concurrency": args.max_concurrency}
    record |= result_fields(metrics, duration, selected, bool(args.goodput))
    if args.save_detailed:
        record["input_lens"] = [r.prompt_len for r in results]
        record["output_lens"] = metrics.output_lens
        record["ttfts"] = [r.ttft for r in results]
        record["itls"] = [r.itl for r in results]
        record["e2els"] = [r.latency for r in results]
        record["generated_texts"] = [r.generated_text for r in results]
        record["errors"] = [r.error for r in results]
    return record


def save_record(record: dict[str, Any], args: argparse.Namespace) -> Path:
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    model = args.model.rstrip("/").split("/")[-1]
    name = args.result_filename or (
        f"{args.backend}-{args.request_rate}qps{concurrency}-{model}-{record['date']}.json"
    )
    path = Path(args.result_dir or ".") / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"Results saved to {path}")
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON record (saved only with --save-result)."""
    selected, percentiles = check_args(args)
    parse_metadata(args.metadata)  # fail before the run, not after it
    tokenizer_id = args.tokenizer or args.model
    tokenizer = load_tokenizer(tokenizer_id, args.trust_remote_code)
    rng = np.random.RandomState(args.seed)  # the reference's np.random.seed(seed) stream
    requests = sample_requests(args, tokenizer, rng)
    base_url, api_url = urls(args)
    client = ClientConfig(
        api_url=api_url,
        model=args.served_model_name or args.model,
        chat=args.backend in CHAT_BACKENDS,
        api_key=args.api_key,
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )
    gc.collect()
    gc.freeze()  # the prompts are static: no GC passes over them during the run
    try:
        results, duration = asyncio.run(run_requests(args, client, base_url, requests, rng))
    finally:
        gc.unfreeze()
    metrics = calculate_metrics(
        requests,
        results,
        duration,
        lambda text: len(tokenizer(text, add_special_tokens=False).input_ids),
        percentiles,
        dict(args.goodput) if args.goodput else None,
    )
    rate = args.request_rate
    print(format_table(metrics, duration, selected, args.max_concurrency, rate, bool(args.goodput)))
    record = build_record(args, tokenizer_id, requests, results, metrics, duration, selected)
    if args.save_result:
        save_record(record, args)
    return record


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(argparse.Namespace(**{**vars(args), "api_key": "***" if args.api_key else None}))
    record = run(args)
    if record["completed"] == 0:
        print("ERROR: every request failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
