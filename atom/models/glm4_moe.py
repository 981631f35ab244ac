"""GLM-4.5 / GLM-4.6 (Glm4MoeForCausalLM): GQA attention with partial NeoX rope, DeepSeek-V3 MoE.

Attention: q/k/v carry a bias when attention_bias (o_proj never does), optional per-head q/k
RMSNorm (use_qk_norm), and rope on the first partial_rotary_factor of each head in NeoX halves.
The first `first_k_dense_replace` layers keep a dense MLP; the rest route with sigmoid scores, a
load-balance bias and grouped top-k (DeepSeek-V3's noaux_tc), plus shared experts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atom.layers.attention import Attention
from atom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from atom.layers.linear import QKVParallelLinear, RowParallelLinear
from atom.layers.mlp import GatedMLP
from atom.layers.moe import FusedMoE, MoERouting, remap_expert_weights
from atom.layers.norm import RMSNorm
from atom.layers.rotary import RotaryEmbedding

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


class Glm4MoeAttention(nn.Module):
    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.attention_bias,
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # attention_bias covers q/k/v only: HF builds o_proj with bias=False.
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=False
        )
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if getattr(config, "use_qk_norm", False):
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        # HF's apply_rotary_pos_emb uses rotate_half (NeoX) on the first rotary_dim features;
        # RotaryEmbedding reads partial_rotary_factor and passes the rest through.
        self.rotary_emb = RotaryEmbedding(config, self.head_dim, max_position, is_neox_style=True)
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            self.num_kv_heads,
            rope=self.rotary_emb,
            qk_norm=(self.q_norm, self.k_norm),
        )

    def forward(self, positions: Tensor, hidden_states: Tensor) -> Tensor:
        # hidden_states: [num_tokens, hidden_size]
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, positions).flatten(1))


class Glm4MoeRouter(nn.Module):
    """mlp.gate: router weight [E, H] and the load-balance bias [E]; float32 like HF."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        experts = config.n_routed_experts
        self.weight = nn.Parameter(
            torch.empty(experts, config.hidden_size, dtype=torch.float32), requires_grad=False
        )
        self.e_score_correction_bias = nn.Parameter(
            torch.empty(experts, dtype=torch.float32), requires_grad=False
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        return F.linear(hidden_states.float(), self.weight)  # [T, E] float32


class Glm4MoeMoE(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        routing = MoERouting(
            top_k=config.num_experts_per_tok,
            renormalize=config.norm_topk_prob,
            scoring_func="sigmoid",
            num_expert_group=config.n_group,
            topk_group=config.topk_group,
            routed_scaling_factor=config.routed_scaling_factor,
        )
        self.gate = Glm4MoeRouter(config)
        self.experts = FusedMoE(
            config.n_routed_experts,
            config.hidden_size,
            config.moe_intermediate_size,
            routing,
            config.hidden_act,
        )
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = GatedMLP(config.hidden_size, shared, config.hidden_act)

    def forward(self, hidden_states: Tensor) -> Tensor:
        logits = self.gate(hidden_states)
        out = self.experts(hidden_states, logits, self.gate.e_score_correction_bias)
        return out + self.shared_experts(hidden_states)


class Glm4MoeDecoderLayer(nn.Module):
    def __init__(self, config: Any, max_position: int, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Glm4MoeAttention(config, max_position)
        self.mlp: nn.Module
        if layer_idx >= config.first_k_dense_replace:  # the rule of HF's Glm4MoeDecoderLayer
            self.mlp = Glm4MoeMoE(config)
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


class Glm4MoeModel(nn.Module):
    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Glm4MoeDecoderLayer(config, max_position, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        return self.norm(hidden_states, residual)[0]


class Glm4MoeForCausalLM(nn.Module):
    packed_modules: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),  # dense and shared experts; routed ones via remap
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = Glm4MoeModel(config, max_position)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def remap_weights(
        self, weights: Iterable[tuple[str, Tensor]]
    ) -> Iterator[tuple[str, Tensor, object]]:
        # Checkpoints append num_nextn_predict_layers MTP layers as model.layers.{N + i}.*;
        # speculative decoding will use them, plain decoding does not: skip them.
        num_layers = self.config.num_hidden_layers
        kept = (
            (name, tensor)
            for name, tensor in weights
            if not ((m := _LAYER_KEY.match(name)) and int(m[1]) >= num_layers)
        )
        # Hub: mlp.experts.{e}.{gate,up,down}_proj.weight; transformers 5 in memory:
        # mlp.experts.gate_up_proj [E, 2I, H] and mlp.experts.down_proj [E, H, I].
        return remap_expert_weights(kept, gate="gate_proj", up="up_proj", down="down_proj")

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: Tensor, out: Tensor | None = None) -> Tensor:
        return self.lm_head.compute_logits(hidden_states, out)
