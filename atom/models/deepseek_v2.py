"""DeepSeek-V2 / V3 (and Kimi-K2, a V3 shape): MLA attention and routed + shared experts.

Attention caches one latent row per token (atom.layers.mla). The first `first_k_dense_replace`
layers keep a dense MLP; after them every `moe_layer_freq`-th layer is a MoE whose output is the
routed experts' plus the shared experts'. V2 routes with softmax scores (greedy or
group_limited_greedy); V3 with sigmoid scores, a load-balance bias and grouped top-k (noaux_tc).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from atom.layers.linear import ColumnParallelLinear, LinearBase, RowParallelLinear
from atom.layers.mla import MLAAttention
from atom.layers.mlp import GatedMLP
from atom.layers.moe import FusedMoE, MoERouting, remap_expert_weights
from atom.layers.norm import RMSNorm
from atom.layers.rotary import RotaryEmbedding, rope_parameters

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config: Any) -> float:
    """qk_head_dim ** -0.5, times yarn's mscale(factor, mscale_all_dim) ** 2 as in HF and vLLM:
    the rope cache carries mscale / mscale_all_dim on q and k, this the rest."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    if params["rope_type"] != "default" and params.get("mscale_all_dim"):
        scale *= yarn_get_mscale(params["factor"], params["mscale_all_dim"]) ** 2
    return scale


class DeepseekV2Attention(nn.Module):
    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.kv_lora_rank, self.v_dim = config.kv_lora_rank, config.v_head_dim
        qk_dim = self.nope_dim + self.rope_dim
        bias = getattr(config, "attention_bias", False)
        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:  # V2-Lite: one full-rank projection
            self.q_proj = ColumnParallelLinear(hidden, heads * qk_dim)
        else:  # the low-rank down projection is small: replicated, not sharded
            self.q_a_proj = LinearBase(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * qk_dim)
        # Every rank needs the whole latent: it is what the cache stores.
        self.kv_a_proj_with_mqa = LinearBase(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = ColumnParallelLinear(
            self.kv_lora_rank, heads * (self.nope_dim + self.v_dim)
        )
        if heads % self.kv_b_proj.tp_size:
            raise ValueError(
                f"num_attention_heads={heads} is not divisible by tensor_parallel_size"
            )
        self.num_heads = heads // self.kv_b_proj.tp_size
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, bias=bias)
        # DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ...: GPT-J style. V3 configs may
        # ask for NeoX halves instead (rope_interleave=False); V2 has no such switch.
        interleave = getattr(config, "rope_interleave", True)
        self.rotary_emb = RotaryEmbedding(config, self.rope_dim, max_position, not interleave)
        self.attn = MLAAttention(
            self.num_heads,
            self.kv_lora_rank,
            self.nope_dim,
            self.rope_dim,
            self.v_dim,
            softmax_scale(config),
        )

    def forward(self, positions: Tensor, hidden_states: Tensor) -> Tensor:
        # hidden_states: [num_tokens, hidden_size]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm.norm(self.q_a_proj(hidden_states)))
        q = q.view(-1, self.num_heads, self.nope_dim + self.rope_dim)
        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden_states).split(
            [self.kv_lora_rank, self.rope_dim], dim=-1
        )
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe.unsqueeze(1))
        q = torch.cat([q_nope, q_pe], dim=-1)
        latent = torch.cat([self.kv_a_layernorm.norm(c_kv), k_pe.squeeze(1)], dim=-1)
        out = self.attn(q, latent, self.kv_b_proj.weight)  # [T, H, v_head_dim]
        return self.o_proj(out.flatten(1))


class DeepseekV2Router(nn.Module):
    """mlp.gate: router weight [E, H] and, for V3, the load-balance bias; float32 like HF."""

    def __init__(self, config: Any, with_bias: bool) -> None:
        super().__init__()
        shape = (config.n_routed_experts, config.hidden_size)
        self.weight = nn.Parameter(torch.empty(shape, dtype=torch.float32), requires_grad=False)
        self.e_score_correction_bias: nn.Parameter | None = None
        if with_bias:
            self.e_score_correction_bias = nn.Parameter(
                torch.empty(config.n_routed_experts, dtype=torch.float32), requires_grad=False
            )

    def forward(self, hidden_states: Tensor) -> Tensor:
        return F.linear(hidden_states.float(), self.weight)  # [T, E] float32


def _routing(config: Any) -> tuple[MoERouting, bool]:
    """(routing, whether it uses e_score_correction_bias) from the config's topk_method."""
    default = "greedy" if config.model_type == "deepseek_v2" else "noaux_tc"
    method = getattr(config, "topk_method", None) or default
    common: dict[str, Any] = dict(
        top_k=config.num_experts_per_tok,
        renormalize=bool(getattr(config, "norm_topk_prob", False)),
        routed_scaling_factor=config.routed_scaling_factor,
    )
    if method == "greedy":  # plain top-k is grouped top-k with a single group
        return MoERouting(**common, num_expert_group=1, topk_group=1), False
    if method == "group_limited_greedy":
        return MoERouting(
            **common, num_expert_group=config.n_group, topk_group=config.topk_group
        ), False
    if method == "noaux_tc":
        scoring = getattr(config, "scoring_func", "sigmoid")
        routing = MoERouting(
            **common,
            scoring_func=scoring,
            num_expert_group=config.n_group,
            topk_group=config.topk_group,
        )
        return routing, True
    raise ValueError(f"unsupported topk_method {method!r}")


class DeepseekV2MoE(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        routing, with_bias = _routing(config)
        self.gate = DeepseekV2Router(config, with_bias)
        self.experts = FusedMoE(
            config.n_routed_experts,
            config.hidden_size,
            config.moe_intermediate_size,
            routing,
            config.hidden_act,
        )
        self.shared_experts: GatedMLP | None = None
        if getattr(config, "n_shared_experts", None):
            shared = config.moe_intermediate_size * config.n_shared_experts
            self.shared_experts = GatedMLP(config.hidden_size, shared, config.hidden_act)

    def forward(self, hidden_states: Tensor) -> Tensor:
        logits = self.gate(hidden_states)
        out = self.experts(hidden_states, logits, self.gate.e_score_correction_bias)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


def _is_moe(config: Any, layer_idx: int) -> bool:
    # The rule of DeepSeek's own modeling code; transformers drops moe_layer_freq (always 1).
    return (
        getattr(config, "n_routed_experts", None) is not None
        and layer_idx >= config.first_k_dense_replace
        and layer_idx % getattr(config, "moe_layer_freq", 1) == 0
    )


class DeepseekV2DecoderLayer(nn.Module):
    def __init__(self, config: Any, max_position: int, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DeepseekV2Attention(config, max_position)
        self.mlp: nn.Module
        if _is_moe(config, layer_idx):
            self.mlp = DeepseekV2MoE(config)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: Tensor, hidden_states: Tensor, residual: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class DeepseekV2Model(nn.Module):
    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DeepseekV2DecoderLayer(config, max_position, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        return self.norm(hidden_states, residual)[0]


class DeepseekV2ForCausalLM(nn.Module):
    packed_modules: ClassVar[dict[str, tuple[str, str | int]]] = {
        "gate_proj": ("gate_up_proj", 0),  # dense and shared experts; routed ones via remap
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekV2Model(config, max_position)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def remap_weights(
        self, weights: Iterable[tuple[str, Tensor]]
    ) -> Iterator[tuple[str, Tensor, object]]:
        # V3 checkpoints append num_nextn_predict_layers MTP layers as model.layers.{N + i}.*;
        # speculative decoding will use them, plain decoding does not: skip them.
        num_layers = self.config.num_hidden_layers
        kept = (
            (name, tensor)
            for name, tensor in weights
            if not ((m := _LAYER_KEY.match(name)) and int(m[1]) >= num_layers)
        )
        return remap_expert_weights(kept, gate="gate_proj", up="up_proj", down="down_proj")

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: Tensor, out: Tensor | None = None) -> Tensor:
        return self.lm_head.compute_logits(hidden_states, out)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """Same modules; V3 differs only in config (routing, rope_interleave), read per layer."""
