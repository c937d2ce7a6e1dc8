"""Runs the model, one step at a time, on one rank; owns the paged KV cache.

Tensor parallelism (Nano-vLLM's scheme): rank 0 lives in the engine process and drives. Ranks 1..N-1
are spawned processes that loop in `worker_main`, each waiting on its semaphore for the next command,
which rank 0 pickles into a shared-memory segment. The model's collectives (torch.distributed: gloo on
CPU, NCCL on GPU) keep the ranks in lockstep inside each forward. NCCL collectives return before the
peers join them, so rank 0 can run ahead of its workers; it writes the next command only once every
worker has acknowledged reading the last one (`read` semaphores), else it could overwrite a command unread.
Rank 0 waits through `workers` (tp_workers.Workers), which notices a dead worker within a fraction of a
second; a worker whose rank 0 has died leaves on its own (it would wait for a command forever).
"""

import multiprocessing as mp
import os
import pickle
import time
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import torch
import torch.distributed as dist

from nanoserve.engine_pod.config import Config
from nanoserve.engine_pod.context import Context, set_context
from nanoserve.engine_pod.layers.attention import Attention, pick_backend
from nanoserve.engine_pod.layers.parallel import set_tensor_parallel
from nanoserve.engine_pod.loader import load_model
from nanoserve.engine_pod.models import build_model
from nanoserve.engine_pod.sampler import SamplingInputs, sample, token_logprobs
from nanoserve.engine_pod.step_inputs import StepInputs, Uploader
from nanoserve.engine_pod.structured_output import GrammarMask, apply_grammar_mask

LEADER_CHECK_S = 1.0  # how often an idle worker checks that rank 0 still lives


@dataclass
class TPLink:
    """How rank 0 reaches its workers: a free TCP port for the process group, one shm segment, and per
    worker a `posted` semaphore (a command waits) and a `read` one (the worker has taken it). Semaphores, not
    Events: Event.set() waits for every waiter to wake, so a worker killed while it waits would hang rank 0."""

    port: int
    shm_name: str
    posted: list
    read: list


class ModelRunner:
    def __init__(self, config: Config, rank: int, link: TPLink | None = None, workers=None):
        self.config, self.rank, self.world = config, rank, config.tensor_parallel_size
        if self.world > 1 and link is None:
            raise ValueError("a tensor-parallel rank needs its TPLink")
        self.link, self.workers = link, workers  # workers: rank 0's tp_workers.Workers
        self.deferred: tuple | None = None  # (logits, sampling, arrays) of a run whose sampling waits for a mask
        self.device = torch.device(f"cuda:{rank}" if config.device.startswith("cuda") else config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{self._tp_link().port}", world_size=self.world, rank=rank
            )
        try:
            self._build(config, link)
        except BaseException:
            if self.world > 1:
                dist.destroy_process_group()
            raise

    def _build(self, config: Config, link: TPLink | None) -> None:
        self.upload = Uploader(self.device)
        self.prev_tokens: torch.Tensor | None = None  # rank 0: the last step's sampled tokens, on the device
        set_tensor_parallel(self.rank, self.world)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(config.torch_dtype)
        with torch.device(self.device):
            self.model = build_model(config.hf_config, config.max_model_len)
        torch.set_default_dtype(default_dtype)
        load_model(self.model, config.model)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        backend = pick_backend(config.attention_backend, config.device, config.kvcache_block_size)
        for layer in self.attention_layers:
            layer.backend = backend
        self.num_kvcache_blocks = self._allocate_kv_cache()
        self.num_sms = (
            torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 1
        )
        self.graphs, self.num_splits_for, self.graph_capture_s = None, None, 0.0
        if backend == "triton":  # imported here: CPU installs need no triton
            from nanoserve.kernels.paged_attention import num_splits_for

            self.num_splits_for = num_splits_for
            if not config.enforce_eager:
                self._capture_graphs()
        if self.world > 1:
            self.shm = SharedMemory(name=self._tp_link().shm_name)
            dist.barrier()

    def _capture_graphs(self) -> None:
        from nanoserve.engine_pod.cuda_graphs import DecodeGraphs

        cfg, a = self.config, self.attention_layers[0]
        t = time.perf_counter()
        self.graphs = DecodeGraphs(
            self.model,
            cfg.max_num_seqs,
            -(-cfg.max_model_len // cfg.kvcache_block_size),
            cfg.hf_config["hidden_size"],
            a.num_kv_heads,
            cfg.torch_dtype,
            self.device,
        )
        self.graphs.capture()
        self.graph_capture_s = time.perf_counter() - t

    # ---- KV cache -----------------------------------------------------------------------------
    def _block_bytes(self) -> int:
        a = self.attention_layers[0]
        dtype_size = torch.empty((), dtype=self.config.torch_dtype).element_size()
        return (
            2 * len(self.attention_layers) * self.config.kvcache_block_size * a.num_kv_heads * a.head_dim * dtype_size
        )

    def _allocate_kv_cache(self) -> int:
        cfg = self.config
        if cfg.num_kvcache_blocks > 0:
            num_blocks = cfg.num_kvcache_blocks
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            stats = torch.cuda.memory_stats(self.device)
            peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
            activations = self._activation_estimate()
            num_blocks = (
                int(total * cfg.gpu_memory_utilization - (total - free) - activations - (peak - current))
                // self._block_bytes()
            )
        else:
            num_blocks = int(cfg.cpu_kvcache_gib * 2**30) // self._block_bytes()
        if self.world > 1:  # every rank must agree on the block count
            t = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            num_blocks = int(t.item())
        if num_blocks < 1:
            from nanoserve.engine_pod.errors import ConfigError

            raise ConfigError("no memory left for the KV cache: raise gpu_memory_utilization or lower max_model_len")
        a = self.attention_layers[0]
        self.kv_cache = torch.empty(
            2,
            len(self.attention_layers),
            num_blocks,
            cfg.kvcache_block_size,
            a.num_kv_heads,
            a.head_dim,
            dtype=cfg.torch_dtype,
            device=self.device,
        )
        for i, layer in enumerate(self.attention_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        return num_blocks

    def _activation_estimate(self) -> int:
        """Bytes a full step's activations may take: a generous multiple of the widest hidden state."""
        hf = self.config.hf_config
        width = max(hf["hidden_size"] * 4, hf["intermediate_size"] * 2 // self.world)
        dtype_size = torch.empty((), dtype=self.config.torch_dtype).element_size()
        return self.config.max_num_batched_tokens * width * dtype_size * 4

    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> tuple | None:
        """Forward one batch and sample its sampling rows. Rank 0 gets (token ids or None, their
        sampler.token_logprobs rows or None: on the device, not waited for; prompt logprobs rows or None: on
        the host), other ranks None. A deferred sampling's tokens come from `sample_deferred`."""
        hidden, t = self._forward(inputs)
        prompt = self._prompt_logprobs(hidden, inputs, t) if inputs.prompt_rows is not None else None
        if inputs.sampling is None:
            return None if self.rank else (None, None, prompt)
        logits = self.model.compute_logits(_logits_rows(hidden, inputs, t))
        if logits is None:  # workers: rank 0 gathered their share
            return None
        if inputs.defer_sampling:  # the mask is being made on the host while this forward runs
            self.deferred = (logits, inputs.sampling, t)
            return None, None, prompt
        return self._sample(logits, inputs.grammar, inputs.sampling, t) + (prompt,)

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs, t: dict):
        """prompt_logprobs: each scored row's logprob of the next prompt token, its rank and the top ones
        (sampler.token_logprobs' layout), copied to the host at once (a rarely used option may wait)."""
        logits = self.model.compute_logits(hidden[t["prompt_rows"]])  # every rank: TP gathers the vocabulary
        if logits is None:
            return None
        return token_logprobs(logits, t["prompt_targets"], inputs.prompt_k).cpu().numpy()

    def sample_deferred(self, mask: GrammarMask | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rank 0: sample the rows of the last `run` that deferred its sampling, under `mask`."""
        assert self.deferred is not None, "sample_deferred without a deferred run"
        (logits, sampling, t), self.deferred = self.deferred, None
        return self._sample(logits, mask, sampling, t)

    @torch.inference_mode()
    def _sample(
        self, logits: torch.Tensor, mask: GrammarMask | None, sampling: SamplingInputs, t: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if mask is not None:  # structured output: before all other processing (vLLM's order)
            apply_grammar_mask(logits, mask)
        tokens = self.prev_tokens = sample(logits, sampling, t, self.prev_tokens)
        logprobs = None
        if sampling.num_logprobs >= 0:
            logprobs = token_logprobs(logits, tokens, sampling.num_logprobs)
        return tokens, logprobs

    def _forward(self, inputs: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The last hidden states of every token, and the step's arrays as uploaded to the device."""
        t = self.upload(inputs)
        input_ids = t["input_ids"]
        if inputs.prev_count and inputs.prev_rows is not None:  # rows whose token only the device has seen
            prev = (
                self.prev_tokens
                if self.rank == 0
                else torch.empty(inputs.prev_count, dtype=torch.int64, device=self.device)
            )
            assert prev is not None, "rank 0 keeps the previous step's tokens"
            if self.world > 1:
                dist.broadcast(prev, src=0)
            rows = t["prev_rows"]
            if inputs.prev_rows.min() >= 0:  # every row's token is on the device (decode): one gather
                input_ids = prev[rows]
            else:
                input_ids = torch.where(rows >= 0, prev[rows.clamp(min=0)], input_ids)
        num_seqs = len(inputs.context_lens)
        is_decode = inputs.max_seqlen_q == 1
        splits = 1
        if is_decode and self.num_splits_for is not None:
            splits = self.num_splits_for(
                num_seqs, self.attention_layers[0].num_kv_heads, inputs.max_seqlen_k, self.num_sms
            )
        if is_decode and self.graphs is not None and self.graphs.fits(num_seqs):
            hidden = self.graphs.run(input_ids, t["positions"], t["slot_mapping"], t["context_lens"], t["block_tables"])
        else:
            set_context(
                Context(
                    slot_mapping=t["slot_mapping"],
                    cu_seqlens_q=t["cu_seqlens_q"],
                    context_lens=t["context_lens"],
                    block_tables=t["block_tables"],
                    max_seqlen_q=inputs.max_seqlen_q,
                    max_seqlen_k=inputs.max_seqlen_k,
                    query_lens_list=np.diff(inputs.cu_seqlens_q).tolist(),
                    context_lens_list=inputs.context_lens.tolist(),
                    is_decode=is_decode,
                    num_splits=splits,
                )
            )
            hidden = self.model(input_ids, t["positions"])
            set_context(None)
        return hidden, t

    def warmup(self) -> None:
        """One full-size prefill step and a decode step with sampled and greedy rows, nothing stored: the
        kernels compile now instead of under the first requests, and a step that cannot fit in memory
        fails here."""
        cfg = self.config
        tokens = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * cfg.max_model_len)
        lens = [min(cfg.max_model_len, tokens - i) for i in range(0, tokens, cfg.max_model_len)]
        for q_lens in (lens, [1] * min(cfg.max_num_seqs, 8)):
            n, seqs, longest = sum(q_lens), len(q_lens), max(q_lens)
            cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
            rows = np.arange(seqs, dtype=np.int64)
            sampling = SamplingInputs(
                temperatures=np.where(rows % 2, 0.0, 1.0),
                top_k=np.full(seqs, -1),
                top_p=np.ones(seqs),
                seeds=rows,
                all_greedy=False,
                needs_top=False,
            )
            self.run(
                StepInputs(
                    input_ids=np.zeros(n, np.int64),
                    positions=np.concatenate([np.arange(q) for q in q_lens]),
                    slot_mapping=np.full(n, -1, np.int64),
                    cu_seqlens_q=cu,
                    context_lens=np.asarray(q_lens, np.int64),
                    block_tables=np.zeros((seqs, -(-longest // cfg.kvcache_block_size)), np.int64),
                    logits_indices=cu[1:] - 1,
                    max_seqlen_q=longest,
                    max_seqlen_k=longest,
                    sampling=sampling,
                )
            )
        self.prev_tokens = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- leader/worker plumbing ---------------------------------------------------------------
    def _tp_link(self) -> TPLink:
        assert self.link is not None  # checked in __init__ for every tensor-parallel rank
        return self.link

    def _shm_buf(self) -> memoryview:
        assert self.shm.buf is not None  # open until exit()
        return self.shm.buf

    def call(self, method: str, *args):
        """Run `method` on every rank (rank 0 broadcasts it through shared memory first)."""
        if self.world > 1 and self.rank == 0:
            data = pickle.dumps((method, args))
            if len(data) + 4 > self.shm.size:
                raise RuntimeError(f"step command of {len(data)} bytes exceeds the shared-memory segment")
            link, workers, buf = self._tp_link(), self.workers, self._shm_buf()
            assert workers is not None, "rank 0 of tensor parallelism watches its workers"
            for rank, read in enumerate(link.read, 1):
                workers.wait(read, rank)
            buf[:4] = len(data).to_bytes(4, "little")
            buf[4 : 4 + len(data)] = data
            for posted in link.posted:
                posted.release()
            try:
                return getattr(self, method)(*args)
            except BaseException as e:  # a collective failed because a worker died? Then say which one.
                workers.explain(e)
                raise
        return getattr(self, method)(*args)

    def _read_command(self):
        link = self._tp_link()
        posted, read = link.posted[self.rank - 1], link.read[self.rank - 1]
        while not posted.acquire(timeout=LEADER_CHECK_S):
            leader = mp.parent_process()
            if leader is not None and not leader.is_alive():
                raise SystemExit(f"tensor-parallel worker {self.rank}: rank 0 (pid {leader.pid}) is gone; leaving")
        buf = self._shm_buf()
        n = int.from_bytes(buf[:4], "little")
        method, args = pickle.loads(buf[4 : 4 + n])
        read.release()
        return method, args

    def loop(self) -> None:
        while True:
            method, args = self._read_command()
            getattr(self, method)(*args)
            if method == "exit":
                break

    def exit(self) -> None:
        if self.world > 1:
            self.shm.close()
            dist.barrier()
            dist.destroy_process_group()

    def abandon(self) -> None:
        """Rank 0 leaves without the workers (they are killed): no collective, which could wait forever."""
        if self.world > 1:
            self.shm.close()
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None and self.device.type == "cuda":
                abort()
            else:
                dist.destroy_process_group()


def _logits_rows(hidden: torch.Tensor, inputs: StepInputs, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The hidden states of the rows that need logits. When every row does (decode), the indices are
    0..n-1 in order: no gather."""
    if len(inputs.logits_indices) == hidden.shape[0]:
        return hidden
    return hidden[t["logits_indices"]]


def worker_main(config: Config, rank: int, link: TPLink) -> None:
    """Entry point of a spawned tensor-parallel worker (rank >= 1)."""
    link.read[rank - 1].release()  # running: rank 0 stops watching for a death during start-up, and may post
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
    ModelRunner(config, rank, link).loop()
