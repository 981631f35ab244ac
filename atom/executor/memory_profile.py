"""The runner's GPU memory accounting: the bytes the KV cache may take.

At `--gpu-memory-utilization` u of the device: u * total, less the peak of a forward at the full
token budget with its LM head and sampler, less the CUDA graphs' pools (the activations of the
largest captured decode batch and the logits buffer every graph writes; the largest mixed step's
activations), less what other processes hold. Measured once, before the cache exists; every
rank then takes the smallest.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from atom.distributed import tp_world_size
from atom.executor.forward_context import ForwardContext, set_forward_context
from atom.executor.sampler import profile_sampling_metadata

if TYPE_CHECKING:
    from atom.executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@torch.inference_mode()
def free_memory_for_kv(runner: ModelRunner) -> int:
    """Bytes left for KV after a forward at the full token budget (the activation peak)."""
    device = runner.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    sched = runner.config.scheduler
    n = sched.max_num_batched_tokens
    # Inputs from the step buffers, as in every later step: inference-mode tensors would differ
    # in dispatch keys and make Dynamo compile the forward twice.
    ids, positions = runner.buffers.input_ids[:n], runner.buffers.positions[:n]
    ids.zero_()
    positions.copy_(torch.arange(n, device=device) % sched.max_model_len)
    with set_forward_context(ForwardContext(runner.attn_layers, None)):
        hidden = runner.forward(ids, positions)  # compiles at level >= 1
    rows = min(sched.max_num_seqs, n)
    logits = runner.model.compute_logits(hidden[-rows:])
    runner.sampler(logits, profile_sampling_metadata(rows, device))  # its sort and copies
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del hidden, logits
    graph_reserve = graph_memory_estimate(runner)
    free, total = torch.cuda.mem_get_info(device)
    in_use_elsewhere = total - free - torch.cuda.memory_reserved(device)
    utilization = runner.config.cache.gpu_memory_utilization
    budget = int(total * utilization) - peak - graph_reserve - in_use_elsewhere
    logger.info(
        "memory: total %.1f GiB, model+activation peak %.2f GiB, CUDA graphs %.2f GiB, "
        "KV budget %.2f GiB",
        total / 2**30,
        peak / 2**30,
        graph_reserve / 2**30,
        budget / 2**30,
    )
    torch.cuda.empty_cache()
    return max(budget, 0)


def graph_memory_estimate(runner: ModelRunner) -> int:
    """The CUDA graphs' pools: the activations of the largest captured decode batch, plus the
    logits buffer every graph writes, plus (their own pool) the activations of the largest mixed
    step's graph."""
    mixed = _activation_peak(runner, runner.mixed_sizes[-1]) if runner.mixed_sizes else 0
    runner.mixed_graph_estimate = mixed  # set beside what the capture then takes
    if not runner.capture_sizes:
        return mixed
    n = runner.capture_sizes[-1]
    decode = _activation_peak(runner, n)
    head = runner.model.lm_head
    # The graphs' shared logits; with tensor parallelism the graphs also hold the shard's output,
    # the gathered parts, NCCL's flat buffer and their concatenation.
    copies = 1 if tp_world_size() == 1 else 4
    logits = copies * n * head.padded_vocab_size * head.weight.element_size()
    return decode + logits + mixed


def _activation_peak(runner: ModelRunner, num_tokens: int) -> int:
    """Bytes a forward of num_tokens allocates at its peak, past what is allocated before it."""
    device = runner.device
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    ids, positions = runner.buffers.input_ids[:num_tokens], runner.buffers.positions[:num_tokens]
    with set_forward_context(ForwardContext(runner.attn_layers, None)):
        hidden = runner.forward(ids, positions)
    torch.cuda.synchronize(device)
    del hidden
    return torch.cuda.max_memory_allocated(device) - base
