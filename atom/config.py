"""Frozen engine configuration, validated once when built (see `atom.args.EngineArgs`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

KV_CACHE_DTYPES = ("auto", "bf16", "fp8")
# Other spellings users bring from vLLM, as the name they mean: its fp8 is e4m3 too. fp8_e5m2 (no
# scales, a 2-bit mantissa) is not implemented, so it stays an error.
KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8", "bfloat16": "bf16"}
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model: str  # what the user asked for (a directory, a .gguf file or a hub id in the local cache)
    model_dir: str  # directory holding config/tokenizer/weights
    gguf_file: str | None  # file name inside model_dir when loading a GGUF checkpoint
    tokenizer: str
    hf_config: Any  # transformers.PretrainedConfig
    dtype: str  # resolved torch dtype name: float32, float16 or bfloat16
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    load_format: str
    seed: int = 0
    trust_remote_code: bool = False
    served_model_name: str = ""
    max_logprobs: int = 20  # the most logprobs / prompt_logprobs a request may ask for
    # SamplingParams defaults from the model's generation_config.json (--generation-config auto)
    sampling_defaults: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES[1:]:
            raise ValueError(f"dtype must be one of {DTYPES[1:]}, got {self.dtype!r}")
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.load_format not in LOAD_FORMATS[1:]:
            raise ValueError(
                f"load_format must be one of {LOAD_FORMATS[1:]}, got {self.load_format!r}"
            )

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        return archs[0] if archs else ""

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def name(self) -> str:
        return self.served_model_name or Path(self.model).name


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"  # auto = the model dtype; fp8 = e4m3 with per-layer scales
    kv_cache_memory_bytes: int | None = None  # explicit KV budget (the CPU default is 2 GiB)
    num_gpu_blocks_override: int | None = None  # exact number of KV blocks, for tests
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or (self.block_size != 1 and self.block_size % 16 != 0):
            raise ValueError(f"block_size must be 1 or a multiple of 16, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        dtype = KV_CACHE_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
        if dtype not in KV_CACHE_DTYPES:
            names = (*KV_CACHE_DTYPES, *KV_CACHE_DTYPE_ALIASES)
            raise ValueError(f"kv_cache_dtype must be one of {names}, got {self.kv_cache_dtype!r}")
        object.__setattr__(self, "kv_cache_dtype", dtype)
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(
                f"num_gpu_blocks_override must be >= 1, got {self.num_gpu_blocks_override}"
            )


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 512
    max_num_batched_tokens: int = 16384  # the token budget of one step
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # >0 caps the prefill chunk of one request per step
    async_scheduling: bool = True  # schedule a step before the previous one's tokens are back

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len})"
            )
        if not self.enable_chunked_prefill and self.long_prefill_token_threshold > 0:
            raise ValueError(
                "long_prefill_token_threshold chunks prompts: it needs chunked prefill"
            )
        if self.long_prefill_token_threshold < 0:
            raise ValueError(
                "long_prefill_token_threshold must be >= 0, "
                f"got {self.long_prefill_token_threshold}"
            )


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    disable_custom_all_reduce: bool = False  # NCCL for every all-reduce (custom_all_reduce.py)

    def __post_init__(self) -> None:
        if not 1 <= self.tensor_parallel_size <= 8:
            raise ValueError(
                f"tensor_parallel_size must be in [1, 8], got {self.tensor_parallel_size}"
            )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size


# Mixed steps' graph sizes (tokens): a step of T tokens pads to the first size >= T, which adds up
# to 50% to its GPU work (to 100% below 512 tokens, where a small model's step is host-bound
# many times over): the host's saving (~0.5-1 ms a layer of an ungraphed step) outweighs it.
# A --mixed-graph-max-tokens past 4096 adds that one size above them.
MIXED_GRAPH_TOKENS = (16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096)


@dataclass(frozen=True, slots=True)
class CompilationConfig:
    level: int = 3  # 0 eager, 1 Dynamo check, 2 Inductor once, 3 piecewise
    enforce_eager: bool = False  # no torch.compile, no CUDA graphs
    cudagraph_capture_sizes: tuple[int, ...] | None = None  # None = [1,2,4,8]+range(16,N+1,16)
    # Steps that are not decode-only (prefill chunks beside decode rows) of up to this many
    # tokens replay a graph of the next MIXED_GRAPH_TOKENS size (executor/mixed_graphs.py); 0: off.
    mixed_graph_max_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.level not in (0, 1, 2, 3):
            raise ValueError(f"level must be 0, 1, 2 or 3, got {self.level}")
        if self.mixed_graph_max_tokens < 0:
            raise ValueError(
                f"mixed_graph_max_tokens must be >= 0, got {self.mixed_graph_max_tokens}"
            )
        if self.cudagraph_capture_sizes is not None and any(
            s < 1 for s in self.cudagraph_capture_sizes
        ):
            raise ValueError(
                f"cudagraph_capture_sizes must be positive, got {self.cudagraph_capture_sizes}"
            )

    def capture_sizes(self, max_num_seqs: int) -> list[int]:
        """Decode batch sizes to capture, capped by max_num_seqs."""
        sizes = self.cudagraph_capture_sizes
        if sizes is None:
            sizes = (1, 2, 4, 8, *range(16, max_num_seqs + 1, 16))
        return sorted({s for s in sizes if s <= max_num_seqs})

    def mixed_graph_sizes(self, max_num_batched_tokens: int) -> list[int]:
        """Token counts of the mixed steps' graphs: MIXED_GRAPH_TOKENS below the cap, then the cap
        (mixed_graph_max_tokens, or the token budget if smaller: a step has no more tokens)."""
        cap = min(self.mixed_graph_max_tokens, max_num_batched_tokens)
        if cap <= 0:
            return []
        return [*(s for s in MIXED_GRAPH_TOKENS if s < cap), cap]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    compilation: CompilationConfig = field(default_factory=CompilationConfig)
    torch_profiler_dir: str | None = None  # start_profile/stop_profile write traces here
    # Tag module forwards in profiler traces; with torch_profiler_dir, also write one capture
    # trace per CUDA graph (DIR/capture_traces/) so replayed kernels map back to modules.
    mark_trace: bool = False
    log_stats: bool = True  # the serving engine's periodic stats line (engine/stats_logger.py)
    device: str = "cpu"  # "cpu" or "cuda"
