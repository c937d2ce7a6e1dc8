"""CUDA graphs for decode and verify steps: the whole forward of a step replayed as one launch.

Graphs are captured for batch sizes 1, 2, 4, 8, then every 16 up to max_num_seqs; a batch runs in the
smallest graph that holds it, its extra rows padded (slot -1: nothing stored; context 0: nothing read).
Inputs are copied into the static buffers the graphs were captured on.

Verify steps of speculative decoding (`width` = 1 + the most draft tokens) have up to `width` query tokens a
sequence; a graph needs one layout, so each sequence gets `width` rows with its tokens at the end (`padded_rows`).
The rows before them are padding: not stored (slot -1), and since a sequence's queries are its context's last
rows, they sit at earlier positions and see only keys the sequence has. Their outputs are dropped.
"""

import numpy as np
import torch

from nanoserve.engine_pod.context import Context, set_context


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    return sorted({b for b in [1, 2, 4, 8] if b <= max_num_seqs} | set(range(16, max_num_seqs + 1, 16)))


def padded_rows(cu_seqlens_q: np.ndarray, width: int) -> np.ndarray:
    """Row of each token of a flat batch in the padded layout: sequence i's q_i tokens in rows
    i * width + width - q_i .. i * width + width - 1 (every q_i <= width)."""
    q_lens = np.diff(cu_seqlens_q)
    seq = np.repeat(np.arange(len(q_lens)), q_lens)
    return np.arange(int(cu_seqlens_q[-1])) + (seq + 1) * width - cu_seqlens_q[seq + 1]


class DecodeGraphs:
    """Graphs of steps whose sequences compute 1 (decode) or up to `width` tokens each (verify steps)."""

    def __init__(
        self,
        model,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        hidden_size: int,
        num_kv_heads: int,
        dtype: torch.dtype,
        device: torch.device,
        width: int = 1,
    ):
        self.model = model
        self.width = width
        self.sizes = graph_batch_sizes(max_num_seqs)
        n, tokens = self.sizes[-1], self.sizes[-1] * width
        self.input_ids = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((tokens,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device) * width
        self.hidden = torch.zeros(tokens, hidden_size, dtype=dtype, device=device)
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.num_kv_heads = num_kv_heads
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    @classmethod
    def for_config(cls, model, config, num_kv_heads: int, device: torch.device, width: int = 1) -> "DecodeGraphs":
        """Sized by an engine Config (max_num_seqs, max_model_len's blocks, hidden size, dtype)."""
        return cls(
            model,
            config.max_num_seqs,
            -(-config.max_model_len // config.kvcache_block_size),
            config.hf_config["hidden_size"],
            num_kv_heads,
            config.torch_dtype,
            device,
            width,
        )

    def _context(self, bs: int, host_lists: bool = False) -> Context:
        from nanoserve.kernels.split_kv import num_splits_for  # (triton: the model runner imports this file on CPU)

        decode = self.width == 1
        return Context(
            slot_mapping=self.slot_mapping[: bs * self.width],
            cu_seqlens_q=self.cu_seqlens_q[: bs + 1],
            context_lens=self.context_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_seqlen_q=self.width,
            max_seqlen_k=0,
            # (the reference attention's host copies: only an uncaptured size runs on it)
            query_lens_list=[self.width] * bs if host_lists else [],
            context_lens_list=self.context_lens[:bs].tolist() if host_lists else [],
            is_decode=decode,
            num_splits=num_splits_for(bs, self.num_kv_heads, 1 << 30, self.num_sms) if decode else 1,
        )

    def _forward(self, bs: int, host_lists: bool = False) -> None:
        m = bs * self.width
        set_context(self._context(bs, host_lists))
        self.hidden[:m] = self.model(self.input_ids[:m], self.positions[:m])
        set_context(None)

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """Capture every size, largest first, so smaller graphs reuse its memory pool (or `pool`: another
        DecodeGraphs', as verify graphs share the decode graphs')."""
        for bs in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            self._forward(bs)  # warm-up, compiles kernels
            with torch.cuda.graph(graph, pool):
                self._forward(bs)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = graph
        self.pool = pool
        torch.cuda.synchronize()

    def fits(self, batch_size: int, max_seqlen_q: int = 1) -> bool:
        return batch_size <= self.sizes[-1] and max_seqlen_q <= self.width

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The step's last hidden states, one row per input token. `rows`: each token's row in the padded
        layout (`padded_rows`, on the device), for width > 1. A size never captured (a CPU check of the
        layout) runs eagerly, unpadded."""
        bs = context_lens.shape[0]
        size = next(s for s in self.sizes if s >= bs) if self.graphs else bs
        if rows is None:
            self.input_ids[:bs].copy_(input_ids)
            self.positions[:bs].copy_(positions)
            self.slot_mapping[:bs].copy_(slot_mapping)
            self.slot_mapping[bs:size].fill_(-1)
        else:  # padding rows keep earlier ids and positions (valid ones), and store nothing
            self.slot_mapping[: size * self.width].fill_(-1)
            self.input_ids.index_copy_(0, rows, input_ids)
            self.positions.index_copy_(0, rows, positions)
            self.slot_mapping.index_copy_(0, rows, slot_mapping)
        self.context_lens[:bs].copy_(context_lens)
        self.context_lens[bs:size].zero_()
        self.block_tables[:bs, : block_tables.shape[1]].copy_(block_tables)
        if size in self.graphs:
            self.graphs[size].replay()
        else:
            self._forward(size, host_lists=True)
        return self.hidden[:bs] if rows is None else self.hidden[rows]
