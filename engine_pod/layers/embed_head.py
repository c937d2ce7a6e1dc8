"""Vocabulary-parallel embedding and LM head. The vocabulary is padded up to a multiple of the TP size."""

import torch
import torch.nn.functional as F
from torch import nn

from nanoserve.engine_pod.layers.parallel import all_reduce, gather_to_rank0, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp_size())
        self.start = tp_rank() * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # pyright: ignore[reportAttributeAccessIssue]  # the loader rides on the parameter, as in Nano-vLLM

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        n = max(0, min(self.shard_size, self.vocab_size - self.start))
        param.data[:n].copy_(loaded[self.start : self.start + n])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * mine.unsqueeze(-1)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits of the rows given; each rank computes its vocabulary slice, rank 0 gathers them."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = gather_to_rank0(F.linear(hidden, self.weight))
        return None if logits is None else logits[..., : self.vocab_size]
