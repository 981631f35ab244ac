"""Qwen3-MoE: Qwen3 attention (per-head q/k RMSNorm) with softmax top-k routed experts.

Layers are sparse where (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers; the
others keep a dense gated MLP of intermediate_size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from torch import Tensor, nn

from atom.layers.attention import Attention, sliding_window_of
from atom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from atom.layers.linear import LinearBase, QKVParallelLinear, RowParallelLinear
from atom.layers.mlp import GatedMLP
from atom.layers.moe import FusedMoE, MoERouting, remap_expert_weights
from atom.layers.norm import RMSNorm
from atom.layers.rotary import RotaryEmbedding


class Qwen3MoeAttention(nn.Module):
    def __init__(self, config: Any, max_position: int, layer_idx: int) -> None:
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=bias,
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias
        )
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, self.head_dim, max_position)
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            self.num_kv_heads,
            sliding_window_of(config, layer_idx),
            rope=self.rotary_emb,
            qk_norm=(self.q_norm, self.k_norm),
        )

    def forward(self, positions: Tensor, hidden_states: Tensor) -> Tensor:
        # hidden_states: [num_tokens, hidden_size]; no batch dimension anywhere
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, positions).flatten(1))


class Qwen3MoeSparseMoeBlock(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        # The router is small and every rank needs all E logits: replicated, not sharded.
        self.gate = LinearBase(config.hidden_size, config.num_experts, bias=False)
        self.experts = FusedMoE(
            config.num_experts,
            config.hidden_size,
            config.moe_intermediate_size,
            MoERouting(top_k=config.num_experts_per_tok, renormalize=config.norm_topk_prob),
            config.hidden_act,
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))


def _is_sparse(config: Any, layer_idx: int) -> bool:
    # The rule of transformers' Qwen3MoeDecoderLayer.
    return (
        layer_idx not in (config.mlp_only_layers or [])
        and config.num_experts > 0
        and (layer_idx + 1) % config.decoder_sparse_step == 0
    )


class Qwen3MoeDecoderLayer(nn.Module):
    def __init__(self, config: Any, max_position: int, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen3MoeAttention(config, max_position, layer_idx)
        self.mlp: nn.Module
        if _is_sparse(config, layer_idx):
            self.mlp = Qwen3MoeSparseMoeBlock(config)
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


class Qwen3MoeModel(nn.Module):
    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen3MoeDecoderLayer(config, max_position, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        return self.norm(hidden_states, residual)[0]


class Qwen3MoeForCausalLM(nn.Module):
    packed_modules: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),  # dense layers only; experts go through remap_weights
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3MoeModel(config, max_position)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def remap_weights(
        self, weights: Iterable[tuple[str, Tensor]]
    ) -> Iterator[tuple[str, Tensor, object]]:
        # Hub: mlp.experts.{e}.{gate,up,down}_proj.weight; transformers 5 in memory:
        # mlp.experts.gate_up_proj [E, 2I, H] and mlp.experts.down_proj [E, H, I].
        return remap_expert_weights(weights, gate="gate_proj", up="up_proj", down="down_proj")

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: Tensor, out: Tensor | None = None) -> Tensor:
        return self.lm_head.compute_logits(hidden_states, out)
