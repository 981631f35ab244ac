"""Qwen3 (dense): Qwen3-shaped, with a per-head RMSNorm on q and k before rotary."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from atom.layers.attention import Attention, sliding_window_of
from atom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from atom.layers.linear import QKVParallelLinear, RowParallelLinear
from atom.layers.mlp import GatedMLP
from atom.layers.norm import NormedRows, RMSNorm
from atom.layers.rotary import RotaryEmbedding


class Qwen3Attention(nn.Module):
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
            qkv=self.qkv_proj,
        )

    def forward(self, positions: Tensor, x: NormedRows) -> Tensor:
        """x: input_layernorm's rows [num_tokens, hidden_size] (no batch dimension anywhere) ->
        the heads' outputs [num_tokens, heads * head_dim], before o_proj (the decoder layer
        runs it with the norm after it). The qkv projection runs in the attention op
        (rotary and the cache write fused at decode)."""
        return self.attn.project_and_attend(x, positions).flatten(1)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Any, max_position: int, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, max_position, layer_idx)
        self.mlp = GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            config.hidden_act,
            bias=False,
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Each norm runs in the linear layer before it (forward_add_norm; over several ranks
        # after its all-reduce) and hands NormedRows to the one after: the precompile's variants.
        for linear in (self.self_attn.o_proj, self.mlp.down_proj):
            linear.norm_after = linear.tp_size == 1
        self.self_attn.qkv_proj.normed_input = self.mlp.gate_up_proj.normed_input = True

    def forward(
        self, positions: Tensor, x: NormedRows, residual: Tensor, next_norm: RMSNorm | None
    ) -> tuple[NormedRows | Tensor, Tensor]:
        """x: input_layernorm's rows of the residual stream -> (next_norm's rows of the stream
        after this layer, or without a next_norm the MLP's output to add to it; the stream).
        Each norm runs with the residual add in the linear layer before it (forward_add_norm)."""
        attn = self.self_attn(positions, x)
        x, residual = self.self_attn.o_proj.forward_add_norm(
            attn, residual, self.post_attention_layernorm
        )
        gated = self.mlp.gate_up_proj(x)
        if next_norm is None:
            return self.mlp.down_proj(gated), residual
        return self.mlp.down_proj.forward_add_norm(gated, residual, next_norm)


class Qwen3Model(nn.Module):
    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config, max_position, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        residual = self.embed_tokens(input_ids)
        x: NormedRows | Tensor = self.layers[0].input_layernorm.rows(residual)
        for i, layer in enumerate(self.layers):
            after = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else None
            x, residual = layer(positions, x, residual, after)
        assert isinstance(x, Tensor)
        return self.norm(x, residual)[0]


class Qwen3ForCausalLM(nn.Module):
    packed_modules: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config, max_position)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: Tensor, out: Tensor | None = None) -> Tensor:
        return self.lm_head.compute_logits(hidden_states, out)
