"""What a token costs a model: the weights it streams and multiplies, the KV cache it reads.

The cost is read off ATOM's own model class built on the meta device (no memory, no weights), so
every family the engine runs is counted as the engine lays it out: packed projections, float32
routers and sinks, MLA's latent cache, sliding windows. Its modules split the parameters in two:

- routed experts: FusedMoE and GptOssExperts layers, whose stacked [E, ...] weights and biases
  hold E equal experts, of which a token uses top_k;
- dense: everything else but the input embedding (its rows are gathered, one per token, not
  streamed); a tied embedding is streamed once, as the LM head.

A decode step of B sequences reads the dense weights once and, in each MoE layer, every expert that
at least one of its B tokens routes to. Routing is taken as uniform and independent per token,
which is what benchmarks with random dummy weights see (the router's logits are noise): an expert
is missed by all B tokens with probability (1 - k/E)^B, so E * (1 - (1 - k/E)^B) experts are read,
k at B = 1 and nearly all E at large B. Trained routers are skewed and hit fewer distinct experts.

A dense model gives the closed forms of the vLLM peer script (tests/benchmarks/test_roofline.py):
every step streams the same bytes whatever B, and the cache holds K and V of every layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# The meta build's max_position: it sizes the rotary cos|sin cache only, a buffer and not a
# parameter, which transformers' initialisers would otherwise compute on the CPU for every layer
# (seconds for a 128k-position model). The tests check the counts against transformers' models.
_META_MAX_POSITION = 16
_DTYPE_BY_ITEMSIZE = {2: torch.bfloat16, 4: torch.float32}


@dataclass(frozen=True, slots=True)
class ExpertLayer:
    """The routed experts of one MoE layer."""

    num_experts: int
    top_k: int
    expert_params: int  # one expert's share of the stacked weights and biases
    expert_bytes: int

    def experts_read(self, batch: int) -> float:
        """Expected distinct experts that `batch` uniformly routed tokens use."""
        return self.num_experts * (1.0 - (1.0 - self.top_k / self.num_experts) ** batch)


@dataclass(frozen=True, slots=True)
class AttentionGroup:
    """The attention layers that share a window (None: full attention), summed."""

    window: int | None
    layers: int
    kv_elems_per_token: int  # cache elements one token of context holds in these layers
    pair_flops: int  # FLOPs of one (query, key) pair in these layers: q.k and p.v over all heads

    def keys(self, context: float) -> float:
        """Keys a query at `context` tokens of context (itself included) attends to."""
        return context if self.window is None else min(context, self.window)

    def causal_pairs(self, n: int) -> float:
        """(query, key) pairs of a causal prefill of n tokens."""
        if self.window is None or n <= self.window:
            return n * (n + 1) / 2
        w = self.window
        return w * (w + 1) / 2 + (n - w) * w


@dataclass(frozen=True, slots=True)
class ModelCost:
    total_params: int  # every parameter, a tied embedding once
    dense_params: int  # used by every token: all but the routed experts and the input embedding
    dense_bytes: int  # their bytes at the model's dtypes
    experts: tuple[ExpertLayer, ...]
    attention: tuple[AttentionGroup, ...]

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies by: the dense ones and top_k experts per MoE layer
        (the input embedding left out, as OpenAI's gpt-oss count; Qwen's model cards add it)."""
        return self.dense_params + sum(e.top_k * e.expert_params for e in self.experts)

    @property
    def max_weight_bytes(self) -> int:
        """Weight bytes of a step that reads every expert (a dense model's at any batch)."""
        return self.dense_bytes + sum(e.num_experts * e.expert_bytes for e in self.experts)

    def weight_bytes(self, batch: int = 1) -> int:
        """Weight bytes a decode step of `batch` sequences streams (uniform routing)."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        experts = sum(e.experts_read(batch) * e.expert_bytes for e in self.experts)
        return self.dense_bytes + round(experts)

    def kv_elems_per_token(self) -> int:
        return sum(g.kv_elems_per_token for g in self.attention)

    def kv_bytes(self, contexts: Iterable[float], kv_dtype_bytes: int) -> float:
        """KV cache bytes a decode step reads for sequences at these contexts."""
        contexts = list(contexts)
        full = sum(contexts)
        elems = sum(
            g.kv_elems_per_token * (full if g.window is None else sum(map(g.keys, contexts)))
            for g in self.attention
        )
        return elems * kv_dtype_bytes

    def attention_flops(self, contexts: Iterable[float]) -> float:
        """Attention FLOPs of one decode step for sequences at these contexts."""
        contexts = list(contexts)
        full = sum(contexts)
        return sum(
            g.pair_flops * (full if g.window is None else sum(map(g.keys, contexts)))
            for g in self.attention
        )

    def prefill_flops(self, n: int) -> float:
        """FLOPs of prefilling a prompt of n tokens: the linear layers and causal attention."""
        pairs = sum(g.pair_flops * g.causal_pairs(n) for g in self.attention)
        return 2 * self.active_params * n + pairs


def model_cost(config: Any, dtype: torch.dtype | int = torch.bfloat16) -> ModelCost:
    """The cost of ATOM's model for an HF config, at `dtype` (or its itemsize: 2 or 4) for the
    parameters the model does not pin to float32. Built unsharded: call it before tensor
    parallelism starts in this process."""
    from atom.distributed import tp_world_size

    if isinstance(dtype, int):
        if dtype not in _DTYPE_BY_ITEMSIZE:
            raise ValueError(f"no model dtype of {dtype} bytes; known: {list(_DTYPE_BY_ITEMSIZE)}")
        dtype = _DTYPE_BY_ITEMSIZE[dtype]
    if tp_world_size() > 1:
        raise RuntimeError("model_cost counts the unsharded model: call it before TP starts")
    cls = _model_class(config)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(config, _META_MAX_POSITION)
    finally:
        torch.set_default_dtype(default_dtype)
    return module_cost(model)


def module_cost(model: nn.Module) -> ModelCost:
    """The cost of a built model, each parameter at its own dtype (a tensor-parallel rank's
    shards, when it is one). Modules other than ATOM's count as dense, with no KV cache."""
    from atom.layers.moe import FusedMoE
    from atom.layers.moe_gpt_oss import GptOssExperts

    config = getattr(model, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    expert_modules = [m for m in model.modules() if isinstance(m, (FusedMoE, GptOssExperts))]
    expert_ids = {id(p) for m in expert_modules for p in m.parameters()}
    total = dense = dense_bytes = 0
    for name, param in model.named_parameters():  # a tied weight once, under the embedding's name
        total += param.numel()
        if id(param) in expert_ids or (name.endswith("embed_tokens.weight") and not tied):
            continue
        dense += param.numel()
        dense_bytes += param.numel() * param.element_size()
    return ModelCost(
        total_params=total,
        dense_params=dense,
        dense_bytes=dense_bytes,
        experts=tuple(_expert_layer(m) for m in expert_modules),
        attention=_attention_groups(model),
    )


def _expert_layer(module: nn.Module) -> ExpertLayer:
    experts = module.num_experts
    routing = getattr(module, "routing", None)  # FusedMoE: MoERouting; GptOssExperts: top_k
    top_k = routing.top_k if routing is not None else module.top_k
    params = sum(p.numel() for p in module.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    if params % experts or nbytes % experts:
        raise ValueError(f"{type(module).__name__}: parameters not stacked over {experts} experts")
    return ExpertLayer(experts, top_k, params // experts, nbytes // experts)


def _attention_groups(model: nn.Module) -> tuple[AttentionGroup, ...]:
    from atom.layers.attention import Attention
    from atom.layers.mla import MLAAttention

    block = 16  # any block size: the cache shape is per block
    groups: dict[int | None, list[int]] = {}
    for layer in model.modules():
        if not isinstance(layer, Attention):
            continue
        elems = math.prod(layer.kv_cache_shape(1, block)) // block
        # q.k over the cached row, p.v over the values. MLA: absorbed (ATOM's CUDA kernel), both
        # in the latent space (kv_lora_rank + rope dims, then kv_lora_rank), or expanded (K and V
        # up-projected per token: nope + rope, then v dims); a bound takes the cheaper one.
        pair = 2 * layer.num_heads * 2 * layer.head_dim
        if isinstance(layer, MLAAttention):
            absorbed = layer.head_dim + layer.kv_lora_rank
            expanded = layer.nope_dim + layer.rope_dim + layer.v_dim
            pair = 2 * layer.num_heads * min(absorbed, expanded)
        group = groups.setdefault(layer.sliding_window, [0, 0, 0])
        group[0] += 1
        group[1] += elems
        group[2] += pair
    return tuple(AttentionGroup(w, n, e, f) for w, (n, e, f) in groups.items())


def _model_class(config: Any) -> type[nn.Module]:
    from atom.model_source import causal_lm_architecture
    from atom.models.registry import get_model_class, supported_architectures

    archs = getattr(config, "architectures", None) or []
    model_type = getattr(config, "model_type", "")
    arch = archs[0] if archs else causal_lm_architecture(model_type)
    if arch not in supported_architectures():
        raise ValueError(f"no ATOM model for {model_type!r} (architecture {arch!r})")
    return get_model_class(arch)
