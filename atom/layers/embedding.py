"""Token embedding and LM head, split over the vocabulary across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atom.distributed import all_gather_last_dim, all_reduce, tp_rank, tp_world_size
from atom.layers.linear import _copy_checked


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        tp = tp_world_size()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp)  # the last shard is zero-padded
        self.vocab_start = tp_rank() * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: Tensor, loaded: Tensor, shard_id: object = None) -> int:
        if loaded.shape[0] != self.vocab_size:
            raise ValueError(
                f"{loaded.shape[0]} vocabulary rows, the config says {self.vocab_size}"
            )
        rows = loaded[self.vocab_start : self.vocab_start + self.shard_size]
        param.data[rows.shape[0] :].zero_()
        _copy_checked(param.data[: rows.shape[0]], rows, "embedding")
        return param.numel()

    def forward(self, input_ids: Tensor) -> Tensor:
        if tp_world_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        valid = (local >= 0) & (local < self.shard_size)
        out = F.embedding(local.clamp(0, self.shard_size - 1), self.weight)
        return all_reduce(out * valid.unsqueeze(-1).to(out.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    @property
    def padded_vocab_size(self) -> int:
        """The width of gathered logits before the padding columns are cut off."""
        return self.shard_size * tp_world_size()

    def compute_logits(self, hidden_states: Tensor, out: Tensor | None = None) -> Tensor:
        """[n, hidden] -> [n, vocab] logits, gathered from every rank; written into out
        ([n, padded vocab], contiguous) when given, e.g. a buffer CUDA graphs share."""
        if out is None:
            logits = all_gather_last_dim(F.linear(hidden_states, self.weight))
        elif tp_world_size() == 1:
            logits = torch.mm(hidden_states, self.weight.t(), out=out)
        else:
            logits = out.copy_(all_gather_last_dim(F.linear(hidden_states, self.weight)))
        return logits[..., : self.vocab_size]
