"""The engine: requests in, tokens out, one `step()` at a time.

`add_request` validates and queues; `step` schedules a batch, runs it on every rank and applies the
sampled tokens; `abort` drops a request and frees its blocks at once. `LLM.generate` (llm.py) and the
HTTP server both drive this class.
"""

import atexit
import random
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

from transformers import AutoTokenizer

from nanoserve.engine_pod.admission import check_request
from nanoserve.engine_pod.block_manager import BlockManager
from nanoserve.engine_pod.config import Config
from nanoserve.engine_pod.errors import InvalidRequestError
from nanoserve.engine_pod.grammar_process import GrammarHandle, GrammarProcess, GrammarReply
from nanoserve.engine_pod.in_flight import InFlight, StepResult, Unsampled
from nanoserve.engine_pod.logits_processing import bad_words_ids
from nanoserve.engine_pod.model_runner import ModelRunner
from nanoserve.engine_pod.sampler import sampling_inputs
from nanoserve.engine_pod.sampling_params import SamplingParams
from nanoserve.engine_pod.scheduler import Scheduler
from nanoserve.engine_pod.sequence import Sequence
from nanoserve.engine_pod.spec_decode import LookPacing, SpecStats
from nanoserve.engine_pod.spec_verify import spec_inputs
from nanoserve.engine_pod.step_inputs import Downloader, prepare
from nanoserve.engine_pod.stop import StopChecker
from nanoserve.engine_pod.structured_output import Grammars, GrammarStep, grammar_mask
from nanoserve.engine_pod.token_logprobs import unpack_logprobs
from nanoserve.engine_pod.tp_workers import Workers

if TYPE_CHECKING:
    import xgrammar


class LLMEngine:
    def __init__(self, model: str, **kwargs):
        config = Config(model, **kwargs)
        self.config = config
        self.workers = Workers(config) if config.tensor_parallel_size > 1 else None
        try:
            if self.workers is not None:
                self.workers.wait_started()
            self.model_runner = ModelRunner(config, 0, self.workers and self.workers.link, self.workers)
            if self.model_runner.device.type == "cuda":
                self.model_runner.call("warmup")
        except BaseException as e:
            if self.workers is not None:
                try:
                    self.workers.explain(e)  # the rendezvous or a collective failed: did a worker die?
                finally:
                    self.workers.stop(timeout=0)  # they may wait in a collective that will never come
            raise
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.block_manager = BlockManager(
            self.model_runner.num_kvcache_blocks, config.kvcache_block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config, self.block_manager)
        self.rng = random.Random(config.seed)  # seeds of the rows that sample without a request seed
        spec = config.speculative
        width = spec.num_speculative_tokens + 2 if spec is not None else 1  # a verify step's row per sequence
        self.download = Downloader(self.model_runner.device, config.max_num_seqs * width)
        self.spec_stats = SpecStats()  # speculative decoding's acceptance so far
        self.spec_pacing = LookPacing() if spec is not None else None  # with async scheduling: when to look
        self._applied_at = time.perf_counter()  # when the last step's tokens were applied (the pacing's clock)
        self.in_flight: InFlight | None = None  # async scheduling: the launched step not yet applied
        self.unsampled: Unsampled | None = None  # ... with structured output: the step whose forward runs unsampled
        self.stop_checker = StopChecker(self.tokenizer)
        self.requests: dict[int, Sequence] = {}
        self.grammars: Grammars | None = None  # built by the first constrained request (xgrammar is optional)
        self.grammar_process: GrammarProcess | None = None  # ... and this with it, if config.grammar_process
        self._grammars_lock = threading.Lock()
        self.constrained: set[int] = set()  # unfinished requests with a grammar
        self.pool_masks = config.device.startswith("cuda")  # masks filled on xgrammar's threads (grammar_mask)
        self._closed = False
        self._broken = False  # a step failed on rank 0: workers may wait in a collective forever
        atexit.register(self.exit)

    def exit(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.grammar_process is not None:
            self.grammar_process.close()
        if self._broken or (self.workers is not None and self.workers.dead()):
            self.model_runner.abandon()
            self._stop_workers(timeout=0)
        else:
            self.model_runner.call("exit")
            self._stop_workers()
        atexit.unregister(self.exit)

    def _stop_workers(self, timeout: float = 30) -> None:
        if self.workers is not None:
            self.workers.stop(timeout)

    def check(self) -> None:
        """Raise WorkerDied if a tensor-parallel worker has exited (the server checks this while idle)."""
        if self.workers is not None:
            self.workers.check()

    # ---- requests -----------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)  # ids: check_request's

    def make_sequence(self, prompt: str | list[int], params: SamplingParams) -> Sequence:
        """Validate one request and turn it into a Sequence (not yet queued)."""
        token_ids = self.tokenize(prompt)
        bm = self.block_manager
        check_request(
            token_ids,
            params,
            self.config.max_model_len,
            bm.block_size,
            bm.num_blocks,
            self.config.hf_config["vocab_size"],
        )
        return self.checked_sequence(token_ids, params)

    def checked_sequence(
        self, token_ids: list[int], params: SamplingParams, seq_id: int | None = None, arrival: float | None = None
    ) -> Sequence:
        """The Sequence of a request already validated (make_sequence, or the server before it sent it to the
        engine core: not again on the step loop). A constrained request's grammar compiles here, which raises
        InvalidRequestError for a bad one: the engine core calls this on a worker thread for those."""
        seq = Sequence(token_ids, params, time.monotonic() if arrival is None else arrival, seq_id)
        if params.bad_words:
            seq.bad_words_ids = bad_words_ids(self.tokenizer, params.bad_words)
        if params.structured_outputs is not None:
            grammars = self._grammars()
            spec = params.structured_outputs
            seq.grammar = grammars.handle(spec, seq.seq_id) if self.grammar_process else grammars.matcher(spec)
        return seq

    def _grammars(self) -> Grammars:
        with self._grammars_lock:
            if self.grammars is None:
                cfg = self.config
                try:
                    grammars = Grammars(cfg.model, cfg.hf_config["vocab_size"], cfg.eos_token_ids)
                except ImportError:
                    raise InvalidRequestError(
                        "structured output needs xgrammar on the server (pip install xgrammar)", "structured_outputs"
                    ) from None
                if cfg.grammar_process:
                    self.grammar_process = GrammarProcess(
                        grammars.info.serialize_json(),
                        cfg.hf_config["vocab_size"],
                        cfg.max_num_seqs,
                        self.pool_masks,
                        self.model_runner.device.type == "cuda",
                    )
                self.grammars = grammars
            return self.grammars

    def add_sequence(self, seq: Sequence) -> None:
        self.requests[seq.seq_id] = seq
        if seq.grammar is not None:
            self.constrained.add(seq.seq_id)
        self.scheduler.add(seq)

    def add_request(self, prompt: str | list[int], params: SamplingParams) -> Sequence:
        seq = self.make_sequence(prompt, params)
        self.add_sequence(seq)
        return seq

    def abort(self, seq_id: int) -> None:
        """Drop a request wherever it is; its blocks are free when this returns."""
        seq = self.requests.pop(seq_id, None)
        self._unconstrain(seq_id)
        if seq is not None and not seq.is_finished:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return not self.scheduler.is_finished() or self.in_flight is not None or self.unsampled is not None

    # ---- one step -----------------------------------------------------------------------------
    def step(self) -> list[tuple[Sequence, int | None]]:
        """Run one batch: `run_step`'s outputs."""
        return self.run_step().outputs

    def run_step(self) -> StepResult:
        """Run one batch. Returns the batch it scheduled, (sequence, tokens computed), and its outputs,
        `(sequence, new token)` for each sequence that got a token (finished ones have `finish_reason`).
        With async scheduling these are the previous step's tokens: this step is launched first, so the GPU
        works on it while the host applies them and schedules the next one. Verify steps too: the step after
        one is laid out as if it accepted every draft token, and the device moves it back (spec_verify.shift_back)."""
        overlap = self.config.async_scheduling
        if overlap and (self.constrained or self.unsampled is not None):
            from nanoserve.engine_pod.constrained_step import constrained_step  # (it imports this module)

            early = []  # constrained_step's pipeline takes one token a row: a verify step's tokens go first
            if self.in_flight is not None and self.in_flight.spec_drafts is not None:
                early, self.in_flight = self._apply(self.in_flight), None
            # (pyright sees this file and nanoserve.engine_pod.llm_engine, its link, as two classes)
            result = constrained_step(self)  # pyright: ignore[reportArgumentType]
            return StepResult(result.batch, early + result.outputs)
        spec_config = self.config.speculative
        # A big batch decodes plainly (CUDA graphs): its verify steps would cost more than they save.
        crowded = spec_config is not None and not spec_config.drafts_at(len(self.scheduler.running))
        self.spec_stats.num_steps_over_batch_size += int(crowded)
        pacing = self.spec_pacing if overlap and not crowded else None
        look = not crowded and (pacing.due() if pacing is not None else True)  # for drafts, this step
        batch = self.scheduler.schedule(drafts=look)
        sampling, tokens, logprobs, spec = [], None, None, None
        if batch:
            inputs, sampling = prepare(batch, self.config.kvcache_block_size)
            if inputs.prev_rows is not None and self.in_flight is not None:
                inputs.prev_count = len(self.in_flight.seqs)
                inputs.prev_verified = self.in_flight.spec_drafts is not None
            if sampling:
                inputs.sampling = sampling_inputs(sampling, self.rng, self.config.eos_token_ids)
                if self.config.speculative is not None:
                    inputs.spec = spec = spec_inputs(sampling, inputs.sampling, self.rng)
                if self.constrained:  # synchronous steps: the mask of the tokens applied last step
                    inputs.grammar = self._mask(sampling).result().mask
            tokens, logprobs, prompt = self._run("run", inputs)
            self._score(inputs, prompt)
            self.scheduler.advance(batch, sampling)
        elif self.in_flight is None and self.has_unfinished():
            raise RuntimeError("scheduler made no progress although requests are pending")
        launched = None
        if sampling:
            assert tokens is not None  # a batch that samples ran the model
            looked = look and self.scheduler.lookups > 0
            launched = InFlight(
                sampling, self.download(tokens, logprobs), looked=looked, launched_at=time.perf_counter()
            )
            if spec is not None:
                launched.spec_drafts = spec.num_drafts.tolist()
        done, self.in_flight = (self.in_flight, launched) if overlap else (launched, None)
        out = self._apply(done) if done is not None else []
        if pacing is not None and done is not None:
            self._pace(pacing, done, len(out))
        return StepResult(batch, out)

    def _pace(self, pacing: LookPacing, done: InFlight, tokens: int) -> None:
        """Tell the pacing what the step just applied gave, over the time since the one before was applied
        (under async scheduling, about its time on the GPU)."""
        now = time.perf_counter()
        seconds, self._applied_at = now - max(self._applied_at, done.launched_at), now  # (not the idle time before)
        pacing.observe(done.looked, done.accepted > 0, tokens, seconds)

    def _score(self, inputs, prompt) -> None:
        if prompt is not None and inputs.prompt_slices is not None:
            self._score_prompts(inputs.prompt_slices, prompt)

    def _score_prompts(self, slices: list[tuple[int, int]], rows) -> None:
        """prompt_logprobs: append each sequence's newly scored prompt tokens."""
        start = 0
        for seq_id, n in slices:
            seq = self.requests.get(seq_id)
            if seq is not None:
                k = seq.params.prompt_logprobs or 0
                seq.prompt_logprobs += [unpack_logprobs(rows[i], k) for i in range(start, start + n)]
            start += n

    def _mask(self, sampling: list[Sequence], accept: tuple | list = ()) -> "Future[GrammarStep] | GrammarReply":
        """Accept and fill (grammar_mask): in the grammar process if there is one, whose reply `result()` reads,
        else here and now."""
        if self.grammar_process is not None:  # (only under async scheduling: constrained_step's)
            return self.grammar_process.step(sampling, list(accept))
        ends = self.grammars.ends if self.grammars is not None else None
        return grammar_mask(sampling, self.config.hf_config["vocab_size"], self.pool_masks, accept, ends)

    def _run(self, method: str, *args, local: bool = False):
        """The model runner's `method`, on every rank (or on rank 0 alone: `local`)."""
        try:
            return getattr(self.model_runner, method)(*args) if local else self.model_runner.call(method, *args)
        except BaseException:
            self._broken = self.config.tensor_parallel_size > 1
            raise

    def _apply(self, flight: "InFlight", grammar_accepted: bool = False) -> list[tuple[Sequence, int | None]]:
        """Put a step's sampled tokens in place of their placeholders; retire what they finish. A token is
        None for a constrained request that ended because its grammar allowed no token. `grammar_accepted`:
        constrained_step has had the matchers accept the tokens (and knows which grammars they complete).
        A verify step's tokens after a row's first are each checked for a stop as if decoded alone, none kept
        past one; then the placeholders of rejected drafts go."""
        out = []
        tokens, accepted = flight.wait()
        logprob_rows = flight.tokens.logprob_rows()
        for row, (seq, token) in enumerate(zip(flight.seqs, tokens)):
            if seq.is_finished:  # aborted, or stopped by the step before, while this one ran
                continue
            position = seq.num_tokens - seq.num_pending  # its oldest placeholder: this step's first
            if seq.grammar is not None and (
                row in flight.blocked or not grammar_accepted and not _accepts(seq.grammar, token)
            ):
                # Only when the mask allowed no token at all (the vocabulary cannot spell what the grammar
                # needs next): the request ends without the token, which is never shown.
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
                token = None
            else:
                if seq.params.logprobs is not None and logprob_rows is not None:
                    seq.logprobs.append(unpack_logprobs(logprob_rows[row], seq.params.logprobs))
                self.scheduler.resolve(seq, position, token)
            if not grammar_accepted and not seq.is_finished and seq.grammar is not None and _here(seq).is_terminated():
                seq.finish_reason = "stop"  # the grammar is complete (it accepted a stop token)
                self.scheduler.finish(seq)
            self._stop_or_retire(seq, position)
            out.append((seq, token))
            more = accepted[row] if accepted is not None else []
            out += self._apply_more(seq, position, token, more, flight.spec_drafts[row] if flight.spec_drafts else 0)
            flight.accepted += len(more)
        return out

    def _apply_more(
        self, seq: Sequence, position: int, first: int | None, more: list[int], num_drafted: int
    ) -> list[tuple[Sequence, int | None]]:
        """After a row's first token (at `position`): a verify step's accepted tokens, each checked for a stop
        as if decoded alone, none kept past one; then the scheduler settles the row's placeholders."""
        if not num_drafted and not seq.flight_basis:  # a plain row, and no draft behind it guessed its token
            return []
        if num_drafted:
            self.spec_stats.add(num_drafted, len(more))
        out: list[tuple[Sequence, int | None]] = []
        for token in more:
            if seq.is_finished:
                return out
            self.scheduler.resolve(seq, position + 1 + len(out), token)
            self._stop_or_retire(seq, position + 1 + len(out))
            out.append((seq, token))
        if not seq.is_finished:
            assert first is not None  # (a row without a token has finished)
            self.scheduler.settle(seq, position, [first, *more[: len(out)]], 1 + num_drafted)
        return out

    def _stop_or_retire(self, seq: Sequence, position: int) -> None:
        """After the token at `position`: a stop it completes ends the sequence, and a finished one retires."""
        if not seq.is_finished and self.stop_checker.hit(seq, position + 1):
            seq.finish_reason = "stop"
            self.scheduler.finish(seq)
        if seq.is_finished:
            self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        """`seq` is finished: out of the scheduler and the engine's books."""
        if not seq.is_finished:
            self.scheduler.finish(seq)
        self.requests.pop(seq.seq_id, None)
        self._unconstrain(seq.seq_id)

    def _unconstrain(self, seq_id: int) -> None:
        self.constrained.discard(seq_id)
        if self.grammar_process is not None:  # its matcher there goes with the next step's work
            self.grammar_process.drop(seq_id)

    def decode(self, seq: Sequence) -> str:
        """The completion text, cut before a matched stop string."""
        return self.stop_checker.text(seq)


def _here(seq: Sequence) -> "xgrammar.GrammarMatcher":
    """The matcher of a synchronous step's constrained row: in this process (the grammar process needs async
    scheduling, whose steps are constrained_step's)."""
    assert seq.grammar is not None and not isinstance(seq.grammar, GrammarHandle)
    return seq.grammar


def _accepts(matcher, token: int) -> bool:
    try:
        return matcher.accept_token(token)
    except (RuntimeError, ValueError, OverflowError):  # an id outside the vocabulary (a fully masked row)
        return False
