"""One CLI definition for every entry point; `--kv-cache-dtype` and `--kv_cache_dtype` both work."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import logging
from dataclasses import dataclass, fields
from typing import Any

from atom.config import (
    DTYPES,
    KV_CACHE_DTYPE_ALIASES,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    CacheConfig,
    CompilationConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from atom.model_source import (
    default_model,
    eos_token_ids,
    load_hf_config,
    resolve_model,
    sampling_defaults,
)

logger = logging.getLogger(__name__)


class FlexibleArgumentParser(argparse.ArgumentParser):
    """Adds the snake_case (or kebab-case) twin of every long option."""

    def add_argument(self, *names: Any, **kwargs: Any) -> argparse.Action:
        twins = []
        for name in names:
            if isinstance(name, str) and name.startswith("--"):
                for twin in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                    if twin != name and twin not in names and twin not in twins:
                        twins.append(twin)
        return super().add_argument(*names, *twins, **kwargs)


def parse_size(text: str) -> int:
    """'4GiB', '512MiB', '2e9' or a plain byte count."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    lowered = text.strip().lower()
    for suffix, scale in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * scale)
    return int(float(lowered))


@dataclass
class EngineArgs:
    model: str | None = None  # None = the embedded SmolLM2 demo model
    tokenizer: str | None = None
    served_model_name: str | None = None
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    dtype: str = "auto"
    seed: int = 0
    max_logprobs: int = 20
    generation_config: str = "auto"  # "auto": the model's sampling defaults; "vllm": ours
    load_format: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = 512
    max_num_batched_tokens: int = 16384
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    async_scheduling: bool = True
    tensor_parallel_size: int = 1
    disable_custom_all_reduce: bool = False
    enforce_eager: bool = False
    level: int = 3
    cudagraph_capture_sizes: list[int] | None = None
    mixed_graph_max_tokens: int = 2048
    device: str | None = None  # None = cuda when available, else cpu
    torch_profiler_dir: str | None = None
    mark_trace: bool = False
    disable_log_stats: bool = False

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        d = EngineArgs()
        a = parser.add_argument
        a(
            "--model",
            default=d.model,
            help="HF directory, .gguf file or cached hub id "
            "(default: the SmolLM2-135M-Instruct demo model)",
        )
        a("--tokenizer", default=None, help="tokenizer path (default: the model's)")
        a("--served-model-name", default=None)
        a("--trust-remote-code", action="store_true")
        a("--dtype", default=d.dtype, choices=DTYPES)
        a("--seed", type=int, default=d.seed)
        a("--max-logprobs", type=int, default=d.max_logprobs)
        a(
            "--generation-config",
            default=d.generation_config,
            choices=["auto", "vllm"],
            help="auto: the model's generation_config.json sets sampling defaults",
        )
        a(
            "--load-format",
            default=d.load_format,
            choices=LOAD_FORMATS,
            help="dummy = random weights from config.json alone",
        )
        a("--max-model-len", type=int, default=None)
        a("--block-size", type=int, default=d.block_size)
        a("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
        a(
            "--kv-cache-dtype",
            default=d.kv_cache_dtype,
            choices=(*KV_CACHE_DTYPES, *KV_CACHE_DTYPE_ALIASES),
            help="fp8: e4m3 with per-layer scales (fp8_e4m3, vLLM's name, is the same)",
        )
        a(
            "--kv-cache-memory",
            dest="kv_cache_memory_bytes",
            type=parse_size,
            default=None,
            help="KV cache budget, e.g. 4GiB (the CPU default is 2GiB)",
        )
        a("--num-gpu-blocks-override", type=int, default=None)
        a("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
        a("--max-num-seqs", type=int, default=d.max_num_seqs)
        a("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
        a("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
        a(
            "--async-scheduling",
            action=argparse.BooleanOptionalAction,
            default=d.async_scheduling,
            help="schedule step N+1 while step N runs (the decode input token is read on the "
            "device); off: each step is scheduled after the previous one is collected",
        )
        a("--long-prefill-token-threshold", type=int, default=0)
        a("--tensor-parallel-size", "-tp", type=int, default=1)
        a(
            "--disable-custom-all-reduce",
            action="store_true",
            help="NCCL for every all-reduce; by default a decode step's small ones go through "
            "symmetric memory (GPUs)",
        )
        a("--enforce-eager", action="store_true")
        a("--level", type=int, default=d.level, choices=[0, 1, 2, 3])
        a("--cudagraph-capture-sizes", type=ast.literal_eval, default=None, help='e.g. "[1,2,4,8]"')
        a(
            "--mixed-graph-max-tokens",
            type=int,
            default=d.mixed_graph_max_tokens,
            help="CUDA graphs for steps that are not decode-only (prefill chunks beside decode "
            "rows) of up to this many tokens, padded to the next captured size; 0: off",
        )
        a("--device", default=None, choices=["cpu", "cuda"])
        a(
            "--torch-profiler-dir",
            default=None,
            help="where start_profile/stop_profile write traces (one folder per rank)",
        )
        a(
            "--mark-trace",
            action="store_true",
            help="tag every module forward in profiler traces (host time on every eager "
            "forward); with --torch-profiler-dir, also write a capture trace per decode CUDA graph "
            "(DIR/capture_traces/)",
        )
        a(
            "--disable-log-stats",
            action="store_true",
            help="no periodic stats line from the serving engine (steps, tok/s, queues, KV "
            "usage; every ATOM_LOG_STATS_INTERVAL seconds, default 10)",
        )
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    def replace(self, **changes: Any) -> EngineArgs:
        return dataclasses.replace(self, **changes)

    def create_engine_config(self) -> EngineConfig:
        device = self.device or _default_device()
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        model = self.model or default_model()
        src = resolve_model(model, self.load_format)
        hf_config = load_hf_config(src, self.trust_remote_code)
        max_pos = getattr(hf_config, "max_position_embeddings", None) or 8192
        max_model_len = self.max_model_len or max_pos
        model_config = ModelConfig(
            model=model,
            model_dir=src.model_dir,
            gguf_file=src.gguf_file,
            tokenizer=self.tokenizer or src.model_dir,
            hf_config=hf_config,
            dtype=_resolve_dtype(self.dtype, hf_config, device),
            max_model_len=max_model_len,
            eos_token_ids=eos_token_ids(src, hf_config),
            load_format=src.load_format,
            seed=self.seed,
            trust_remote_code=self.trust_remote_code,
            served_model_name=self.served_model_name or "",
            max_logprobs=self.max_logprobs,
            sampling_defaults=sampling_defaults(src.model_dir)
            if self.generation_config == "auto"
            else (),
        )
        sizes = tuple(self.cudagraph_capture_sizes) if self.cudagraph_capture_sizes else None
        return EngineConfig(
            model=model_config,
            cache=CacheConfig(
                block_size=self.block_size,
                gpu_memory_utilization=self.gpu_memory_utilization,
                kv_cache_dtype=self.kv_cache_dtype,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                enable_prefix_caching=self.enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_model_len=max_model_len,
                enable_chunked_prefill=self.enable_chunked_prefill,
                long_prefill_token_threshold=self.long_prefill_token_threshold,
                async_scheduling=self.async_scheduling,
            ),
            parallel=ParallelConfig(self.tensor_parallel_size, self.disable_custom_all_reduce),
            compilation=CompilationConfig(
                self.level, self.enforce_eager, sizes, self.mixed_graph_max_tokens
            ),
            torch_profiler_dir=self.torch_profiler_dir,
            mark_trace=self.mark_trace,
            log_stats=not self.disable_log_stats,
            device=device,
        )


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str, hf_config: Any, device: str) -> str:
    """auto: float32 on the CPU; on the GPU the checkpoint's 16-bit dtype, else bfloat16."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        return dtype
    if device == "cpu":
        return "float32"
    name = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", "") or "")
    name = name.removeprefix("torch.")
    return name if name in ("float16", "bfloat16") else "bfloat16"
