"""Mixtral: Llama/Mistral attention with 8 experts per layer, softmax top-2, renormalised."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from torch import Tensor, nn

from atom.layers.attention import Attention, sliding_window_of
from atom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from atom.layers.linear import LinearBase, QKVParallelLinear, RowParallelLinear
from atom.layers.moe import FusedMoE, MoERouting, remap_expert_weights
from atom.layers.norm import RMSNorm
from atom.layers.rotary import RotaryEmbedding


class MixtralAttention(nn.Module):
    def __init__(self, config: Any, max_position: int, layer_idx: int) -> None:
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=False,
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=False
        )
        self.rotary_emb = RotaryEmbedding(config, self.head_dim, max_position)
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            self.num_kv_heads,
            sliding_window_of(config, layer_idx),
            rope=self.rotary_emb,
        )

    def forward(self, positions: Tensor, hidden_states: Tensor) -> Tensor:
        # hidden_states: [num_tokens, hidden_size]; no batch dimension anywhere
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, positions).flatten(1))


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        # The router is small and every rank needs all E logits: replicated, not sharded.
        self.gate = LinearBase(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = FusedMoE(
            config.num_local_experts,
            config.hidden_size,
            config.intermediate_size,  # Mixtral's intermediate_size is each expert's
            MoERouting(top_k=config.num_experts_per_tok, renormalize=True),
            config.hidden_act,
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))


class MixtralDecoderLayer(nn.Module):
    def __init__(self, config: Any, max_position: int, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MixtralAttention(config, max_position, layer_idx)
        self.block_sparse_moe = MixtralSparseMoeBlock(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: Tensor, hidden_states: Tensor, residual: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.block_sparse_moe(hidden_states), residual


class MixtralModel(nn.Module):
    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MixtralDecoderLayer(config, max_position, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        return self.norm(hidden_states, residual)[0]


class MixtralForCausalLM(nn.Module):
    packed_modules: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }

    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = MixtralModel(config, max_position)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def remap_weights(
        self, weights: Iterable[tuple[str, Tensor]]
    ) -> Iterator[tuple[str, Tensor, object]]:
        # Hub: block_sparse_moe.{gate.weight, experts.{e}.w1/w3/w2.weight} (w1 gate, w3 up,
        # w2 down); transformers 5 in memory: mlp.gate.weight, mlp.experts.gate_up_proj
        # [E, 2I, H] and mlp.experts.down_proj [E, H, I].
        renamed = ((name.replace(".mlp.", ".block_sparse_moe."), t) for name, t in weights)
        return remap_expert_weights(renamed, gate="w1", up="w3", down="w2")

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: Tensor, out: Tensor | None = None) -> Tensor:
        return self.lm_head.compute_logits(hidden_states, out)
