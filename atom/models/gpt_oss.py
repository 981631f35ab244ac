"""GPT-OSS: attention with sinks and biases, sliding and full layers alternating, YaRN rope, and
biased experts with a clamped SwiGLU routed top-k then softmax. bf16 weights (MXFP4 not yet)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from torch import Tensor, nn

from atom.layers.attention import Attention, sliding_window_of
from atom.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from atom.layers.linear import LinearBase, QKVParallelLinear, RowParallelLinear
from atom.layers.moe_gpt_oss import GPT_OSS_EXPERT_PARAMS, GptOssExperts
from atom.layers.norm import RMSNorm
from atom.layers.rotary import RotaryEmbedding

_MXFP4_SUFFIXES = ("_blocks", "_scales")


class GptOssAttention(nn.Module):
    def __init__(self, config: Any, max_position: int, layer_idx: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
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
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            bias=config.attention_bias,
        )
        # HF's _apply_rotary_emb rotates the two halves of each head: neox style.
        self.rotary_emb = RotaryEmbedding(config, self.head_dim, max_position, is_neox_style=True)
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            self.num_kv_heads,
            sliding_window_of(config, layer_idx),
            sinks=True,
            rope=self.rotary_emb,
        )

    def forward(self, positions: Tensor, hidden_states: Tensor) -> Tensor:
        # hidden_states: [num_tokens, hidden_size]; no batch dimension anywhere
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, positions).flatten(1))


class GptOssMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        # The router is small and every rank needs all E logits: replicated, not sharded.
        self.router = LinearBase(config.hidden_size, config.num_local_experts, bias=True)
        self.experts = GptOssExperts(
            config.num_local_experts,
            config.hidden_size,
            config.intermediate_size,
            config.num_experts_per_tok,
            alpha=getattr(config, "swiglu_alpha", 1.702),  # older configs: the paper's constants
            limit=getattr(config, "swiglu_limit", 7.0),
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.experts(hidden_states, self.router(hidden_states))


class GptOssDecoderLayer(nn.Module):
    def __init__(self, config: Any, max_position: int, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = GptOssAttention(config, max_position, layer_idx)
        self.mlp = GptOssMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: Tensor, hidden_states: Tensor, residual: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class GptOssModel(nn.Module):
    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            GptOssDecoderLayer(config, max_position, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        return self.norm(hidden_states, residual)[0]


class GptOssForCausalLM(nn.Module):
    packed_modules: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }

    def __init__(self, config: Any, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = GptOssModel(config, max_position)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def remap_weights(
        self, weights: Iterable[tuple[str, Tensor]]
    ) -> Iterator[tuple[str, Tensor, object]]:
        # self_attn.sinks [heads] lives on the Attention layer; experts' gate_up_proj[_bias] and
        # down_proj[_bias] go to GptOssExperts' stacked parameters (its loader de-interleaves).
        for name, tensor in weights:
            if name.endswith(_MXFP4_SUFFIXES):
                raise ValueError(f"{name}: MXFP4 experts are not supported yet; use bf16 weights")
            prefix, _, last = name.rpartition(".")
            if last == "sinks":
                yield f"{prefix}.attn.sinks", tensor, None
            elif prefix.endswith(".experts") and last in GPT_OSS_EXPERT_PARAMS:
                yield f"{prefix}.{GPT_OSS_EXPERT_PARAMS[last]}", tensor, None
            else:
                yield name, tensor, None

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: Tensor, out: Tensor | None = None) -> Tensor:
        return self.lm_head.compute_logits(hidden_states, out)
