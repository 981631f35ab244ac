"""ModelRunner: builds the model on its device, owns the KV cache, runs one scheduled step."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor
from torch.profiler import record_function

from atom.config import EngineConfig
from atom.distributed import all_reduce_min, broadcast_from_first
from atom.engine.outputs import ModelRunnerOutput, SchedulerOutput
from atom.executor.compile import compile_forward
from atom.executor.cuda_graphs import DecodeGraphs
from atom.executor.eager_steps import eager_step_size, eager_step_sizes, load_gemm_kernels
from atom.executor.forward_context import ForwardContext, set_forward_context
from atom.executor.graph_capture import capture_decode_graphs, capture_mixed_graphs, mixed_seqs
from atom.executor.input_batch import (
    CachedRequestState,
    StepBuffers,
    StepInputs,
    build_sampling_metadata,
    build_step_inputs,
)
from atom.executor.loader import checkpoint_weights, init_dummy_weights, load_weights
from atom.executor.memory_profile import free_memory_for_kv
from atom.executor.mixed_graphs import MixedGraphs
from atom.executor.precompile import StandIn, start_precompile
from atom.executor.profiling import TorchProfiler, tag_modules, tagged
from atom.executor.sampler import (
    Sampler,
    SamplerOutput,
    SamplingMetadata,
    prompt_logprob_entries,
)
from atom.executor.step_output import QueuedStep, record_samples, to_host
from atom.executor.trace_labels import step_label
from atom.layers.attention import Attention
from atom.layers.moe import compile_model_expert_kernels
from atom.models.registry import get_model_class

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 2 << 30


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def kv_cache_torch_dtype(config: EngineConfig) -> torch.dtype:
    if config.cache.kv_cache_dtype == "fp8":
        return torch.float8_e4m3fn
    if config.cache.kv_cache_dtype == "bf16":
        return torch.bfloat16
    return torch_dtype(config.model.dtype)


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.device = (
            torch.device(config.device, rank) if config.device == "cuda" else torch.device("cpu")
        )
        self.dtype = torch_dtype(config.model.dtype)
        self.block_size = config.cache.block_size
        self.states: dict[str, CachedRequestState] = {}
        self.sampler = Sampler()
        torch.manual_seed(config.model.seed)  # unseeded requests draw from the global generator
        start = time.perf_counter()
        self.model = self._build_model()
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for i, layer in enumerate(self.attn_layers):
            layer.layer_index.fill_(i)
        logger.info("model loaded in %.1f s", time.perf_counter() - start)
        if config.mark_trace:
            n = tag_modules(self.model) + tag_modules(self.sampler, "sampler")
            self.model.compute_logits = tagged(self.model.compute_logits, "compute_logits")
            self.sampler.plain_draw = tagged(self.sampler.plain_draw, "sampler")  # graphs' draw
            logger.info("mark-trace: %d modules tagged", n)
        sched = config.scheduler
        comp = config.compilation
        fast = self.device.type == "cuda" and not comp.enforce_eager
        self.capture_sizes = comp.capture_sizes(sched.max_num_seqs) if fast else []
        max_blocks = -(-sched.max_model_len // self.block_size)
        self.buffers = StepBuffers(
            max(sched.max_num_batched_tokens, *self.capture_sizes, 1),
            mixed_seqs(config),  # max_num_seqs, and a mixed graph's padding sequence
            max_blocks,
            self.device,
        )
        # Compilation is a GPU matter: on the CPU the reference kernels run eagerly.
        self.compiled_forward = compile_forward(self.model, comp.level if fast else 0)
        self.graphs: DecodeGraphs | None = None
        # Mixed steps' graphs: plain attention (MLA's prefill path differs) on one GPU (a
        # graph's all-reduce at thousands of tokens is not the custom one's size).
        self.plain_attention = all(type(layer) is Attention for layer in self.attn_layers)
        mixed = fast and self.plain_attention and config.parallel.tensor_parallel_size == 1
        self.mixed_sizes = comp.mixed_graph_sizes(sched.max_num_batched_tokens) if mixed else []
        self.mixed_graphs: MixedGraphs | None = None
        # Larger steps (not decode-only) pad to a few token counts whose GEMMs the start-up runs.
        low = self.mixed_sizes[-1] if self.mixed_sizes else 0
        eager = fast and self.plain_attention
        self.eager_sizes = eager_step_sizes(low, sched.max_num_batched_tokens) if eager else []
        self.mixed_graph_estimate = 0  # their pool's bytes in the KV budget (memory_profile.py)
        self.profiler = TorchProfiler(
            config.torch_profiler_dir, rank, config.model.model, self.device, config.mark_trace
        )
        # Two pinned buffers: with async scheduling step N+1 copies its ids while step N's wait
        # still reads.
        self._sampled_host = [
            torch.zeros(
                sched.max_num_seqs, dtype=torch.int64, pin_memory=self.device.type == "cuda"
            )
            for _ in range(2)
        ]
        self._steps = 0
        # The last sampling step's ids on the device and the row of each request in them: the
        # input of a decode whose token is still pending (async scheduling).
        self._last_sampled: Tensor | None = None
        self._last_rows: dict[str, int] = {}
        # The shapes of the precompile's launches and of the graphs' attention warm-ups.
        self._stand_in = StandIn(
            self.device, self.dtype, kv_cache_torch_dtype(config), self.block_size
        )
        # Last: attention's and gemv's Triton variants compile on other threads until
        # allocate_kv_cache.
        self._precompile = start_precompile(self.model, self._stand_in, sched.max_num_seqs)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """Hidden states of the model (inside a forward context). One token runs the eager model:
        Dynamo specialises a token count of 1, and its second compile cost 15-25 s of an 8B
        model's start-up; batch 1 is the same kernels without Inductor's fusions."""
        if input_ids.shape[0] == 1:
            return self.model(input_ids, positions)
        return self.compiled_forward(input_ids, positions)

    def _build_model(self) -> torch.nn.Module:
        mc = self.config.model
        cls = get_model_class(mc.architecture)
        max_position = max(mc.max_model_len, getattr(mc.hf_config, "max_position_embeddings", 0))
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = cls(mc.hf_config, max_position)
        finally:
            torch.set_default_dtype(default_dtype)
        if mc.load_format == "dummy":
            init_dummy_weights(model, mc.seed)
        else:
            load_weights(model, checkpoint_weights(mc))
        return model.eval()

    # ---- KV cache ----
    def kv_bytes_per_block(self) -> int:
        itemsize = torch.empty(0, dtype=kv_cache_torch_dtype(self.config)).element_size()
        per_block = sum(math.prod(a.kv_cache_shape(1, self.block_size)) for a in self.attn_layers)
        return per_block * itemsize

    def determine_num_kv_blocks(self) -> int:
        cache = self.config.cache
        if cache.kv_cache_dtype == "fp8":
            self._calibrate_kv_scales()
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        if cache.kv_cache_memory_bytes is not None:
            budget = cache.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            budget = free_memory_for_kv(self)
        else:
            budget = CPU_DEFAULT_KV_BYTES
        # Every rank must agree; the one with the least memory decides.
        return all_reduce_min(max(budget // self.kv_bytes_per_block(), 0), self.device)

    @torch.inference_mode()
    def _calibrate_kv_scales(self) -> None:
        """Per-layer fp8 KV scales from the K/V maxima of one forward over random tokens."""
        n = min(self.config.scheduler.max_num_batched_tokens, self.config.model.max_model_len, 1024)
        gen = torch.Generator(self.device).manual_seed(self.config.model.seed)
        vocab = self.config.model.hf_config.vocab_size
        ids = torch.randint(0, vocab, (n,), generator=gen, device=self.device)
        for layer in self.attn_layers:
            layer.kv_amax = (0.0, 0.0)
        with set_forward_context(ForwardContext(self.attn_layers, None)):
            # Attention runs eagerly inside its op at every level: it records the maxima.
            self.model(ids, torch.arange(n, device=self.device))
        for layer in self.attn_layers:
            layer.set_kv_scales_from_amax()
        logger.info(
            "fp8 KV scales: k %.3g..%.3g, v %.3g..%.3g",
            min(a.k_scale for a in self.attn_layers),
            max(a.k_scale for a in self.attn_layers),
            min(a.v_scale for a in self.attn_layers),
            max(a.v_scale for a in self.attn_layers),
        )

    @property
    def needs_warmup(self) -> bool:
        """Triton compiles a kernel variant on its first launch: on CUDA the engine runs one
        request through prefill and decode before it reports ready (tests/gpu)."""
        return self.device.type == "cuda"

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._join_precompile()  # before any paged-attention launch
        if self.device.type == "cuda":
            self._compile_expert_kernels()  # before the cache takes the memory they borrow
        dtype = kv_cache_torch_dtype(self.config)
        for layer in self.attn_layers:
            shape = layer.kv_cache_shape(num_blocks, self.block_size)
            layer.kv_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        if self.capture_sizes:
            capture_decode_graphs(self)
        if self.mixed_sizes:
            capture_mixed_graphs(self)
        if self.device.type == "cuda":
            self._load_lm_head_kernels()
        if self.eager_sizes:
            self._load_layer_gemm_kernels()

    def _load_layer_gemm_kernels(self) -> None:
        """The layer GEMMs at every eager step size (executor/eager_steps.py): as the LM head's
        below, no ungraphed step then loads a cuBLAS kernel behind queued work."""
        start = time.perf_counter()
        n = load_gemm_kernels(self.model, self.eager_sizes)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # what the KV budget left free stays free
        sizes = self.eager_sizes
        seconds = time.perf_counter() - start
        logger.info(
            "layer GEMMs run at %d eager step sizes (%d..%d tokens): %d in %.2f s",
            len(sizes), sizes[0], sizes[-1], n, seconds,
        )  # fmt: skip

    @torch.inference_mode()
    def _load_lm_head_kernels(self) -> None:
        """The LM head's GEMM once at every row count an eager step can sample (1 to
        max_num_seqs, at most the token budget). cuBLAS's first GEMM that needs a kernel not
        used yet in the process waits until the device has run everything queued before it
        (H200, Qwen3-0.6B's head behind 40 ms of queued matmuls: 35-42 ms at 62, 91, 119, 148,
        178, 209, 237, 256 and 300 rows; 0.07-0.4 ms at the same counts again, or at 63, 92,
        120, 301 after them). The bench's prefill steps sample a new row count each (prompts
        finishing, decode rows joining): four of its eight held the host until the GPU drained,
        which then idled 4-8 ms for the next step's scheduling and inputs."""
        start = time.perf_counter()
        sched = self.config.scheduler
        most = min(sched.max_num_seqs, sched.max_num_batched_tokens)  # the memory profile's
        hidden = torch.zeros(
            (most, self.model.lm_head.weight.shape[1]), dtype=self.dtype, device=self.device
        )
        # Largest first: each smaller logits tensor fits the block the one before freed. Growing
        # sizes took a new allocator segment every 2 MiB past 10 MiB and kept the old ones cached
        # (the caching allocator's rules: ~6 GiB for Qwen3's vocabulary at 512 rows).
        for rows in range(most, 0, -1):
            self.model.compute_logits(hidden[:rows])
        torch.cuda.synchronize(self.device)
        del hidden
        torch.cuda.empty_cache()  # what the KV budget left free stays free
        logger.info("LM head run at 1..%d rows in %.2f s", most, time.perf_counter() - start)

    @torch.inference_mode()
    def _compile_expert_kernels(self) -> None:
        """Every tile configuration the MoE layers can pick, compiled now rather than on the
        first request of each prompt-length class."""
        start = time.perf_counter()
        if compile_model_expert_kernels(self.model, self.config.scheduler.max_num_batched_tokens):
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # the KV cache is sized to the memory these runs borrowed
            logger.info("expert kernels compiled in %.1f s", time.perf_counter() - start)

    def _pad_mixed(self, num_tokens: int) -> tuple[int, int] | None:
        if self.mixed_graphs is None:
            return None
        size = self.mixed_graphs.padded_size(num_tokens)
        return None if size is None else (size, mixed_seqs(self.config))

    def _pad_eager(self, num_tokens: int) -> int | None:
        """A step's token count past every mixed graph: eager_sizes holds what it pads to."""
        if not self.eager_sizes:
            return None
        return eager_step_size(num_tokens, self.config.scheduler.max_num_batched_tokens)

    def _pad_to(self, num_seqs: int) -> int | None:
        return None if self.graphs is None else self.graphs.padded_size(num_seqs)

    def _join_precompile(self) -> None:
        if self._precompile is not None:
            self._precompile.wait()
            self._precompile = None

    def shutdown(self, sync: bool = True) -> None:
        """Stop the precompile and the profiler, destroy the CUDA graphs (a tensor-parallel
        rank leaves its NCCL group after this, which waits for them: DecodeGraphs.release;
        sync False where a rank died), and free the KV cache: Dynamo's caches may keep the
        model alive after the engine, and a later engine of the process would count the cache
        against its own budget."""
        self._join_precompile()
        if self.profiler.running:
            self.stop_profile()
        if self.graphs is not None:
            self.graphs.release(sync)
            self.graphs = None
        if self.mixed_graphs is not None:
            self.mixed_graphs.release(sync)
            self.mixed_graphs = None
        for layer in self.attn_layers:
            layer.kv_cache = torch.empty(0)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- torch profiler ----
    def start_profile(self) -> None:
        self.profiler.start()

    def stop_profile(self) -> None:
        """Writes DIR/rank_<r>/<model>_ts_<unix ms>.pt.trace.json.gz."""
        self.profiler.stop()

    # ---- one step ----
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.submit_model(sched)()

    @torch.inference_mode()
    def submit_model(self, sched: SchedulerOutput) -> Callable[[], ModelRunnerOutput]:
        """Queues the step on the device and returns the function that waits for its output
        (the step's one host sync). One step may be submitted before the previous one's wait
        (async scheduling): a decode whose input token that step is sampling reads it from the
        device, and seeds and min_tokens count the pending token."""
        self._update_states(sched)
        if sched.is_empty:
            return ModelRunnerOutput
        inputs = build_step_inputs(
            sched,
            self.states,
            self.block_size,
            self.buffers,
            self._pad_to,
            self._pad_mixed,
            self._pad_eager,
        )
        if inputs.pending_inputs:
            self._fill_pending_inputs(inputs.pending_inputs)
        rows = [self.states[inputs.req_ids[i]] for i in inputs.sample_rows]
        # Built before the forward is queued: its small host-to-device copies then wait for nothing.
        sampling = build_sampling_metadata(rows, self.buffers) if rows else None
        self.buffers.staged()
        num_rows = inputs.input_ids.shape[0]
        graph = self.graphs is not None and inputs.is_decode_only and num_rows in self.graphs
        # The step's device work, from the forward to the copy of the sampled ids, labelled
        # while the profiler runs (the label is not built otherwise).
        label = nullcontext()
        if self.profiler.running:
            attn = inputs.attn
            label = record_function(
                step_label(
                    attn.query_start_loc_cpu,
                    attn.seq_lens_cpu,
                    len(inputs.req_ids),
                    inputs.is_decode_only,
                    num_rows if graph else None,
                )
            )
        with label:
            logits, prompt_logprobs = self._forward(inputs, graph, bool(rows))
            out = ModelRunnerOutput(
                req_ids=inputs.req_ids,
                sampled_token_ids=[[] for _ in inputs.req_ids],
                logprobs=[None] * len(inputs.req_ids),
                prompt_logprobs=prompt_logprobs,
            )
            if logits is None or sampling is None:
                self._last_sampled = None
                return lambda: out
            result = self._sample(logits, sampling, num_rows if graph else None)
            broadcast_from_first(result.sampled)  # ranks must feed back the same tokens
            self._steps += 1
            sampled = self._sampled_host[self._steps % 2][: len(rows)]
            sampled.copy_(result.sampled, non_blocking=True)
            # Read on the device by the next step's inputs, which are queued before its replays:
            # a graph draw's output is valid until then (DecodeGraphs.replay_sample).
            self._last_sampled = result.sampled
            self._last_rows = {state.req_id: j for j, state in enumerate(rows)}
            for state in rows:
                state.num_pending += 1
            if result.logprobs is not None:
                # To pinned memory too: a .tolist() of a device tensor would also wait for the
                # step queued after this one.
                result = SamplerOutput(
                    result.sampled,
                    to_host(result.logprob_token_ids),
                    to_host(result.logprobs),
                    to_host(result.ranks),
                )
            done = torch.cuda.Event() if self.device.type == "cuda" else None
            if done is not None:
                done.record()

        def wait() -> ModelRunnerOutput:
            if done is not None:
                done.synchronize()
            record_samples(inputs, rows, sampled.tolist(), result, out)
            return out

        return QueuedStep(wait, done)

    def _sample(
        self, logits: Tensor, sampling: SamplingMetadata, graph_rows: int | None
    ) -> SamplerOutput:
        """The sampler's output; after a graph replay of graph_rows rows, a plain draw replays
        its own graph."""
        plain = graph_rows is not None and self.sampler.draws_plain(logits, sampling)
        if plain and self.graphs is not None and self.graphs.draw_graphs:
            sampled = self.graphs.replay_sample(graph_rows)[: logits.shape[0]]
            return SamplerOutput(sampled, None, None, None)
        return self.sampler(logits, sampling)

    def _fill_pending_inputs(self, pending: list[tuple[int, str]]) -> None:
        """Decode inputs sampled by the step still in flight, copied on the device."""
        assert self._last_sampled is not None
        n, b = len(pending), self.buffers
        index = b.put(b.pending, [t for t, _ in pending] + [self._last_rows[r] for _, r in pending])
        tokens = self._last_sampled.index_select(0, index[n:]).to(b.input_ids.dtype)
        b.input_ids.index_copy_(0, index[:n], tokens)

    def _forward(
        self, inputs: StepInputs, graph: bool, sample: bool
    ) -> tuple[Tensor | None, dict[str, list]]:
        """The logits of the sampling rows (None when nothing samples) and prompt logprobs."""
        if graph:
            num_rows = inputs.input_ids.shape[0]
            assert self.graphs is not None
            # Decode-only: row i is sequence i's one token, all sampled, so the sampling rows
            # are the first rows in order (a view: no gather kernel, no wait on its indices).
            logits = self.graphs.replay(num_rows, inputs.attn.max_seq_len)
            return logits[: len(inputs.sample_rows)], {}
        if inputs.mixed_graph:
            assert self.mixed_graphs is not None
            hidden = self.mixed_graphs.replay(inputs.input_ids.shape[0])[: inputs.num_tokens]
        else:
            with set_forward_context(ForwardContext(self.attn_layers, inputs.attn)):
                hidden = self.forward(inputs.input_ids, inputs.positions)
        prompt_logprobs = prompt_logprob_entries(
            inputs, hidden, self.states, self.model.compute_logits
        )
        logits = self.model.compute_logits(hidden[inputs.logits_indices]) if sample else None
        return logits, prompt_logprobs

    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            state = self.states.pop(req_id, None)
            if state is not None:
                self.buffers.block_rows.release(state)
        for new in sched.new_reqs:
            stale = self.states.get(new.req_id)  # its drop never arrived (a failed submit)
            if stale is not None:
                self.buffers.block_rows.release(stale)
            params = new.sampling_params
            # Seeded per drawn position when sampling (input_batch.position_seed); CUDA draws
            # from Philox seeds instead (atom.kernels.sampling).
            seeded = params.seed is not None and self.device.type != "cuda"
            gen = torch.Generator(self.device) if seeded else None
            self.states[new.req_id] = CachedRequestState(
                new.req_id,
                new.prompt_token_ids,
                list(new.output_token_ids),
                params,
                list(new.block_ids),
                new.num_computed_tokens,
                gen,
            )
        for cached in sched.cached_reqs:
            state = self.states[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens  # before this step
