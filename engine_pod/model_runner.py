"""Runs the model, one step at a time, on one rank; owns the paged KV cache.

Tensor parallelism (Nano-vLLM's scheme): rank 0 lives in the engine process and drives. Ranks 1..N-1
are spawned processes that loop in `worker_main`, reading each command rank 0 posts (tp_commands.py). The
model's collectives (torch.distributed: gloo on CPU, NCCL on GPU) keep the ranks in lockstep inside each
forward. Rank 0 waits through `workers` (tp_workers.Workers), which notices a dead worker within a
fraction of a second; a worker whose rank 0 has died leaves on its own.
"""

import gc
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from nanoserve.engine_pod.config import Config
from nanoserve.engine_pod.context import Context, set_context
from nanoserve.engine_pod.cuda_graphs import padded_rows
from nanoserve.engine_pod.kv_cache import allocate_kv_cache, num_blocks_that_fit
from nanoserve.engine_pod.layers.attention import Attention, pick_backend
from nanoserve.engine_pod.layers.parallel import set_tensor_parallel
from nanoserve.engine_pod.loader import load_model
from nanoserve.engine_pod.models import build_model
from nanoserve.engine_pod.sampler import SamplingInputs, sample, token_logprobs
from nanoserve.engine_pod.spec_verify import SpecInputs, shift_back, verify
from nanoserve.engine_pod.step_inputs import StepInputs, Uploader
from nanoserve.engine_pod.structured_output import GrammarMask, apply_grammar_mask
from nanoserve.engine_pod.tp_commands import CommandChannel, TPLink


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
        if self.device.type == "cuda":  # the KV cache budget counts this engine's peak, not an earlier one's
            torch.cuda.reset_peak_memory_stats(self.device)
        self.upload = Uploader(self.device)
        self.prev_tokens: torch.Tensor | None = None  # rank 0: the last step's sampled tokens, on the device
        self.prev_shift: torch.Tensor | None = None  # ... after a verify step, each row's rejected draft tokens
        set_tensor_parallel(self.rank, self.world)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(config.torch_dtype)
        with torch.device(self.device):
            self.model = build_model(config.hf_config, config.max_model_len)
        torch.set_default_dtype(default_dtype)
        load_model(self.model, config.model)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        backend = pick_backend(
            config.attention_backend, config.device, config.kvcache_block_size, config.kv_cache_dtype
        )
        for layer in self.attention_layers:
            layer.backend = backend
        self.num_kvcache_blocks = num_blocks_that_fit(config, self.attention_layers, self.device, self.world)
        self.kv_cache = allocate_kv_cache(config, self.attention_layers, self.num_kvcache_blocks, self.device)
        self.num_sms = (
            torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 1
        )
        self.graphs, self.num_splits_for, self.graph_capture_s = None, None, 0.0
        self.verify_graphs = None  # speculative decoding's verify steps (cuda_graphs.DecodeGraphs, width 1 + K)
        if backend == "triton":  # imported here: CPU installs need no triton
            from nanoserve.kernels.split_kv import num_splits_for

            self.num_splits_for = num_splits_for
            if not config.enforce_eager:
                self._capture_graphs()
        if self.world > 1:
            self.channel = CommandChannel(self._tp_link(), self.rank)
            dist.barrier()

    def _capture_graphs(self) -> None:
        t = time.perf_counter()
        self.graphs = self.step_graphs(1)
        self.graphs.capture()
        if self.config.speculative is not None:  # verify steps: 1 + up to K tokens a sequence
            self.verify_graphs = self.step_graphs(1 + self.config.speculative.num_speculative_tokens)
            self.verify_graphs.capture(self.graphs.pool)
        self.graph_capture_s = time.perf_counter() - t

    def step_graphs(self, width: int):
        """cuda_graphs.DecodeGraphs (not captured yet) of steps of up to `width` tokens a sequence."""
        from nanoserve.engine_pod.cuda_graphs import DecodeGraphs

        kv_heads = self.attention_layers[0].num_kv_heads
        return DecodeGraphs.for_config(self.model, self.config, kv_heads, self.device, width)

    # ---- KV cache -----------------------------------------------------------------------------
    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, inputs: StepInputs) -> tuple | None:
        """Forward one batch and sample its sampling rows. Rank 0 gets (token ids or None, their
        sampler.token_logprobs rows or None: on the device, not waited for; prompt logprobs rows or None: on
        the host), other ranks None. A deferred sampling's tokens come from `sample_deferred`."""
        set_tensor_parallel(self.rank, self.world)  # engines may share a process: the layers read this one's
        hidden, t = self._forward(inputs)
        prompt = self._prompt_logprobs(hidden, inputs, t) if inputs.prompt_rows is not None else None
        if inputs.sampling is None:
            return None if self.rank else (None, None, prompt)
        logits = self.model.compute_logits(_logits_rows(hidden, inputs, t))
        if logits is None:  # workers: rank 0 gathered their share
            return None
        if inputs.spec is not None:
            return self._verify(logits, inputs, t) + (prompt,)
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
        self.prev_shift = None
        logprobs = None
        if sampling.num_logprobs >= 0:
            logprobs = token_logprobs(logits, tokens, sampling.num_logprobs)
        return tokens, logprobs

    def _verify(self, logits: torch.Tensor, inputs: StepInputs, t: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A verify step (speculative decoding): spec_verify.verify's [seqs, width + 2]
        rows, flattened, and the logprobs of each row's first token (rows without a draft ask for them)."""
        assert inputs.sampling is not None and inputs.spec is not None
        first = torch.cumsum(t["spec_num_drafts"] + 1, 0) - t["spec_num_drafts"] - 1
        if inputs.grammar is not None:  # constrained rows have no draft: their one row is their first
            rows = logits[first]
            apply_grammar_mask(rows, inputs.grammar)
            logits = logits.index_copy(0, first, rows)
        out = verify(logits, inputs.sampling, inputs.spec, t, self.prev_tokens)
        emitted = out[:, :1]  # each row's last emitted token is the next step's input
        self.prev_tokens = out.gather(1, emitted).squeeze(1)
        self.prev_shift = t["spec_num_drafts"] + 1 - emitted.squeeze(1)
        logprobs = None
        if inputs.sampling.num_logprobs >= 0:
            logprobs = token_logprobs(logits[first], out[:, 1], inputs.sampling.num_logprobs)
        return out.reshape(-1), logprobs

    def _forward(self, inputs: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The last hidden states of every token, and the step's arrays as uploaded to the device."""
        num_seqs = len(inputs.context_lens)
        is_decode = inputs.max_seqlen_q == 1
        verify = self.verify_graphs
        if is_decode or verify is None or not verify.fits(num_seqs, inputs.max_seqlen_q):
            verify = None
        else:  # (a verify step, or any of up to 1 + K tokens a sequence)
            inputs.padded_rows = padded_rows(inputs.cu_seqlens_q, verify.width)
        t = self.upload(inputs)
        input_ids = t["input_ids"]
        shifted_lens = None  # the torch backend's host context lengths, when the device moved them back
        if inputs.prev_count and inputs.prev_rows is not None:  # rows whose token only the device has seen
            prev, shift = self._previous(inputs)
            rows = t["prev_rows"]
            if inputs.prev_rows.min() >= 0:  # every row's token is on the device (decode): one gather
                input_ids = prev[rows]
            else:
                input_ids = torch.where(rows >= 0, prev[rows.clamp(min=0)], input_ids)
            if shift is not None:
                shift_back(t, shift, self.config.kvcache_block_size)
                if self.attention_layers[0].backend == "torch":  # (the reference reads host lists)
                    shifted_lens = t["context_lens"].tolist()
        splits = 1
        if is_decode and self.num_splits_for is not None:
            splits = self.num_splits_for(
                num_seqs, self.attention_layers[0].num_kv_heads, inputs.max_seqlen_k, self.num_sms
            )
        if is_decode and self.graphs is not None and self.graphs.fits(num_seqs):
            hidden = self.graphs.run(input_ids, t["positions"], t["slot_mapping"], t["context_lens"], t["block_tables"])
        elif verify is not None:
            hidden = verify.run(
                input_ids, t["positions"], t["slot_mapping"], t["context_lens"], t["block_tables"], t["padded_rows"]
            )
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
                    context_lens_list=inputs.context_lens.tolist() if shifted_lens is None else shifted_lens,
                    is_decode=is_decode,
                    num_splits=splits,
                )
            )
            hidden = self.model(input_ids, t["positions"])
            set_context(None)
        return hidden, t

    def _previous(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The previous step's sampled tokens by row and, after a verify step, each row's rejected draft
        tokens: rank 0 keeps them on the device and broadcasts them to the other ranks."""
        count, verified = inputs.prev_count, inputs.prev_verified
        if self.rank == 0:
            assert self.prev_tokens is not None, "rank 0 keeps the previous step's tokens"
            assert (self.prev_shift is not None) == verified, "the engine and rank 0 disagree on the last step"
            state = torch.cat([self.prev_tokens, self.prev_shift]) if self.prev_shift is not None else self.prev_tokens
        else:
            state = torch.empty(count * (1 + verified), dtype=torch.int64, device=self.device)
        if self.world > 1:
            dist.broadcast(state, src=0)
        return state[:count], state[count:] if verified else None

    def warmup(self) -> None:
        """One full-size prefill step and a decode step with sampled and greedy rows, nothing stored: the
        kernels compile now instead of under the first requests, and a step that cannot fit in memory
        fails here. With speculative decoding also a verify step and the move back of the step behind one
        (spec_verify.shift_back): kernels outside the graphs that plain steps never use."""
        cfg = self.config
        tokens = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * cfg.max_model_len)
        lens = [min(cfg.max_model_len, tokens - i) for i in range(0, tokens, cfg.max_model_len)]
        for q_lens in (lens, [1] * min(cfg.max_num_seqs, 8)):
            self.run(_warmup_step(q_lens, cfg.kvcache_block_size))
        if cfg.speculative is not None:
            k, seqs = cfg.speculative.num_speculative_tokens, min(cfg.max_num_seqs, 2)
            step = _warmup_step([1 + k] * seqs, cfg.kvcache_block_size, every_row=True)
            rows = seqs * (1 + k)
            step.spec = SpecInputs(np.full(seqs, k), np.zeros((seqs, k), np.int64), np.arange(rows), np.zeros(rows))
            self.run(step)
            after = {  # a decode step of those sequences, its slots stored nowhere unless moved back
                "cu_seqlens_q": torch.arange(seqs + 1, device=self.device),
                "positions": torch.full((seqs,), 1 + k, device=self.device),
                "prev_rows": torch.arange(seqs, device=self.device),
                "block_tables": torch.zeros(
                    (seqs, -(-(2 + k) // cfg.kvcache_block_size)), dtype=torch.int64, device=self.device
                ),
                "slot_mapping": torch.full((seqs,), -1, device=self.device),
                "context_lens": torch.full((seqs,), 2 + k, device=self.device),
            }
            shift_back(after, torch.zeros(seqs, dtype=torch.int64, device=self.device), cfg.kvcache_block_size)
        self.prev_tokens = self.prev_shift = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- leader/worker plumbing ---------------------------------------------------------------
    def _tp_link(self) -> TPLink:
        assert self.link is not None  # checked in __init__ for every tensor-parallel rank
        return self.link

    def call(self, method: str, *args):
        """Run `method` on every rank (rank 0 posts it to the workers first)."""
        if self.world > 1 and self.rank == 0:
            workers = self.workers
            assert workers is not None, "rank 0 of tensor parallelism watches its workers"
            self.channel.post(method, args, workers)
            try:
                return getattr(self, method)(*args)
            except BaseException as e:  # a collective failed because a worker died? Then say which one.
                workers.explain(e)
                raise
        return getattr(self, method)(*args)

    def loop(self) -> None:
        while True:
            method, args = self.channel.read()
            getattr(self, method)(*args)
            if method == "exit":
                break

    def exit(self) -> None:
        if self.world > 1:
            self.channel.close()
            dist.barrier()
            dist.destroy_process_group()
        self._release()

    def _release(self) -> None:
        """Give the device memory back (weights, KV cache, CUDA graphs), so that another engine can start in
        this process: the KV cache is sized from the free memory."""
        self.graphs = self.verify_graphs = self.deferred = self.prev_tokens = self.prev_shift = None
        self.attention_layers = []
        set_tensor_parallel(0, 1)  # what the layers of a model built next in this process read by default
        for name in ("model", "kv_cache"):
            self.__dict__.pop(name, None)
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def abandon(self) -> None:
        """Rank 0 leaves without the workers (they are killed): no collective, which could wait forever."""
        if self.world > 1:
            self.channel.close()
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None and self.device.type == "cuda":
                abort()
            else:
                dist.destroy_process_group()
        self._release()


def _warmup_step(q_lens: list[int], block_size: int, every_row: bool = False) -> StepInputs:
    """A step of sequences computing `q_lens` tokens from position 0, half of them sampled and half greedy,
    that stores nothing (its slots are -1). `every_row`: logits at every token (a verify step's)."""
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
    return StepInputs(
        input_ids=np.zeros(n, np.int64),
        positions=np.concatenate([np.arange(q) for q in q_lens]),
        slot_mapping=np.full(n, -1, np.int64),
        cu_seqlens_q=cu,
        context_lens=np.asarray(q_lens, np.int64),
        block_tables=np.zeros((seqs, -(-longest // block_size)), np.int64),
        logits_indices=np.arange(n) if every_row else cu[1:] - 1,
        max_seqlen_q=longest,
        max_seqlen_k=longest,
        sampling=sampling,
    )


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
