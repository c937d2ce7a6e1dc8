"""CUDA graphs for decode steps: the whole forward of a decode batch replayed as one launch.

Graphs are captured for batch sizes 1, 2, 4, 8, then every 16 up to max_num_seqs; a batch runs in the
smallest graph that holds it, its extra rows padded (slot -1: nothing stored; context 0: nothing read).
Inputs are copied into the static buffers the graphs were captured on.
"""

import torch

from nanoserve.engine_pod.context import Context, set_context
from nanoserve.kernels.split_kv import num_splits_for


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    return sorted({b for b in [1, 2, 4, 8] if b <= max_num_seqs} | set(range(16, max_num_seqs + 1, 16)))


class DecodeGraphs:
    def __init__(
        self,
        model,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        hidden_size: int,
        num_kv_heads: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.model = model
        self.sizes = graph_batch_sizes(max_num_seqs)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.num_kv_heads = num_kv_heads
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _context(self, bs: int) -> Context:
        return Context(
            slot_mapping=self.slot_mapping[:bs],
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            context_lens=self.context_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_seqlen_q=1,
            max_seqlen_k=0,
            query_lens_list=[],
            context_lens_list=[],
            is_decode=True,
            num_splits=num_splits_for(bs, self.num_kv_heads, 1 << 30, self.num_sms),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            graph = torch.cuda.CUDAGraph()
            set_context(self._context(bs))
            self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])  # warm-up, compiles kernels
            with torch.cuda.graph(graph, pool):
                self.hidden[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = graph
            set_context(None)
        torch.cuda.synchronize()

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> torch.Tensor:
        bs = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= bs)
        self.input_ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(positions)
        self.slot_mapping[:bs].copy_(slot_mapping)
        self.slot_mapping[bs:size].fill_(-1)
        self.context_lens[:bs].copy_(context_lens)
        self.context_lens[bs:size].zero_()
        self.block_tables[:bs, : block_tables.shape[1]].copy_(block_tables)
        self.graphs[size].replay()
        return self.hidden[:bs]
