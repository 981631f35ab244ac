"""The runner's CUDA graphs, captured once its KV cache exists: what each graph runs over the static
step buffers (input_batch.StepBuffers), and the start-up's log of them. The graphs themselves:
cuda_graphs.py (decode batches) and mixed_graphs.py (steps that are not decode-only).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from atom.config import EngineConfig
from atom.executor.cuda_graphs import DecodeGraphs, context_caps
from atom.executor.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from atom.executor.input_batch import StepBuffers
from atom.executor.mixed_graphs import MixedGraphs
from atom.executor.precompile import attend_padding_rows
from atom.kernels.attention_config import num_sms

if TYPE_CHECKING:
    from atom.executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def mixed_seqs(config: EngineConfig) -> int:
    """A mixed graph's sequences: one more than a step can have, so that a padding sequence
    (seq_len 0) always owns the padding tokens, whose attention rows are then zeros."""
    return config.scheduler.max_num_seqs + 1


def graph_meta(
    b: StepBuffers, tokens: int, seqs: int, max_query_len: int, max_seq_len: int
) -> AttentionMetadata:
    """Attention metadata over the static step buffers, as a graph captures it."""
    return AttentionMetadata(
        slot_mapping=b.slot_mapping[:tokens],
        block_tables=b.block_tables[:seqs],
        seq_lens=b.seq_lens[:seqs],
        query_start_loc=b.query_start_loc[: seqs + 1],
        seq_lens_cpu=[],
        query_start_loc_cpu=[],
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
    )


@torch.inference_mode()
def capture_decode_graphs(runner: ModelRunner) -> None:
    """runner.graphs: a graph of the model and its LM head per decode batch size (and context
    cap), and one of the plain draw per size."""
    start = time.perf_counter()
    device, b, model = runner.device, runner.buffers, runner.model
    before = torch.cuda.memory_reserved(device)
    sizes = runner.capture_sizes
    n = sizes[-1]
    b.input_ids[:n].zero_()
    b.positions[:n].zero_()
    b.slot_mapping[:n].fill_(-1)  # padding rows write nothing ...
    b.seq_lens[:n].zero_()  # ... and attend to nothing
    b.query_start_loc[: n + 1].copy_(torch.arange(n + 1, device=device))
    # Every graph writes its logits into one buffer (a step reads them before the next replay,
    # in stream order): [size, vocab] logits of their own would cost GiBs.
    logits = model.lm_head.weight.new_empty((n, model.lm_head.padded_vocab_size))

    def decode_meta(size: int, max_seq_len: int) -> AttentionMetadata:
        return graph_meta(b, size, size, 1, max_seq_len)

    def forward(size: int, max_seq_len: int) -> Tensor:
        """Logits of a decode batch of `size` rows read from the step buffers. Attention's grid
        depends only on the shapes and max_seq_len, fixed here."""
        with set_forward_context(
            ForwardContext(runner.attn_layers, decode_meta(size, max_seq_len))
        ):
            hidden = runner.forward(b.input_ids[:size], b.positions[:size])
        return model.compute_logits(hidden, out=logits[:size])

    def sample(size: int) -> Tensor:
        """The plain draw over `size` rows of the graphs' logits, from the sampling buffers
        (build_sampling_metadata writes a step's columns there; rows past it are padding)."""
        rows = logits[:size, : model.lm_head.vocab_size]
        return runner.sampler.plain_draw(rows, b.temperature[2][:size], b.seeds[2][:size])

    caps = context_caps(
        sizes,
        runner.config.scheduler.max_model_len,
        {layer.decode_kind() for layer in runner.attn_layers},
        num_sms(device),
    )
    # Set before the captures: a failed one leaves the runner graphs its shutdown releases.
    runner.graphs = graphs = DecodeGraphs(caps)
    profiler = runner.profiler
    trace = profiler.capture_trace if profiler.records_captures else None

    # Attention alone warms a size's shorter caps and the middle sizes (DecodeGraphs.capture;
    # the stand-ins cover the unified kernel, not MLA's: its sizes all run whole forwards).
    def warm_attention(size: int, cap: int) -> None:
        attend_padding_rows(runner.attn_layers, decode_meta(size, cap), runner._stand_in)

    graphs.capture(forward, trace, sample, warm_attention if runner.plain_attention else None)
    warmups = graphs.warmup_seconds  # slow sizes: Triton compiling the variants they need
    slowest = sorted(warmups.items(), key=lambda kv: -kv[1])[:4]
    logger.info(
        "captured %d CUDA graphs (decode batch %d..%d) and %d of the draw in %.1f s, %.2f GiB; "
        "warm-ups %.1f s (median %.0f ms, slowest %s), captures %.1f s",
        len(graphs),
        sizes[0],
        n,
        graphs.draw_graphs,
        time.perf_counter() - start,
        (torch.cuda.memory_reserved(device) - before) / 2**30,
        sum(warmups.values()),
        1e3 * statistics.median(warmups.values()),
        ", ".join(
            f"batch {size} (contexts <= {cap}) {seconds * 1e3:.0f} ms"
            for (size, cap), seconds in slowest
        ),
        graphs.capture_seconds,
    )


@torch.inference_mode()
def capture_mixed_graphs(runner: ModelRunner) -> None:
    """runner.mixed_graphs: a whole-forward graph per mixed step size (mixed_graphs.py)."""
    start = time.perf_counter()
    device, b = runner.device, runner.buffers
    before = torch.cuda.memory_reserved(device)
    seqs, max_len = mixed_seqs(runner.config), runner.config.scheduler.max_model_len
    sizes = runner.mixed_sizes
    n = sizes[-1]
    b.input_ids[:n].zero_()
    b.positions[:n].zero_()
    b.slot_mapping[:n].fill_(-1)  # nothing written ...
    b.seq_lens[:seqs].zero_()
    b.query_start_loc[: seqs + 1].zero_()  # ... and no query row in any sequence

    def forward(size: int) -> Tensor:
        """Hidden states of a mixed step padded to `size` tokens in `seqs` sequences, read from
        the step buffers. The longest query taken as the size: a launch whose q-blocks hold any
        query of a step."""
        meta = graph_meta(b, size, seqs, size, max_len)
        with set_forward_context(ForwardContext(runner.attn_layers, meta)):
            return runner.forward(b.input_ids[:size], b.positions[:size])

    runner.mixed_graphs = graphs = MixedGraphs(sizes)
    graphs.capture(forward)
    taken = torch.cuda.memory_reserved(device) - before
    estimate = runner.mixed_graph_estimate
    logger.info(
        "captured %d CUDA graphs of mixed steps (%d..%d tokens) in %.1f s, %.2f GiB "
        "(%.2f GiB in the KV budget); warm-ups %.1f s, captures %.1f s",
        len(graphs),
        sizes[0],
        n,
        time.perf_counter() - start,
        taken / 2**30,
        estimate / 2**30,
        graphs.warmup_seconds,
        graphs.capture_seconds,
    )
    if estimate and taken > 1.25 * estimate + (64 << 20):
        logger.warning(
            "the mixed graphs took %.2f GiB, more than the %.2f GiB the KV budget left them: "
            "lower --gpu-memory-utilization or --mixed-graph-max-tokens if memory runs out",
            taken / 2**30,
            estimate / 2**30,
        )
