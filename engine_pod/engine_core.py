"""The engine core process: the LLMEngine stepped in a loop, in a process of its own (vLLM V1's EngineCore),
so that the HTTP server's work (parsing, detokenizing, JSON, sockets) never takes the engine's host time or
its GIL.

The server (async_engine.py) talks to it through two pipes. In: ("add", seq_id, token_ids, params, arrival),
("abort", seq_id), ("subscribe", sub_id), ("unsubscribe", sub_id), ("stop",). Out: ("ready", EngineInfo),
one ("step", StepOutput) a step, ("counts", EngineCounts) when idle counts change, ("admitted" | "rejected",
seq_id[, error]) for constrained requests (their grammars compile on threads here, off the loop),
("snapshot", sub_id, hashes), and ("failed", error) before it exits on a fault. It exits when told to, and
when the server's end of the pipe closes (the server died).
"""

import concurrent.futures
import contextlib
import logging
import pickle
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from nanoserve.common.gc_heap import freeze_heap
from nanoserve.engine_pod import errors
from nanoserve.engine_pod.config import Config


@dataclass
class EngineInfo:
    """What the server needs to know of the loaded engine."""

    config: Config
    num_blocks: int


@dataclass
class EngineCounts:
    waiting: int  # in the scheduler's waiting queue, or compiling a grammar
    running: int
    kv_usage: float  # fraction of KV blocks in use
    received: int  # "add" messages read so far (the server counts those in the pipe as waiting too)


@dataclass
class StepOutput:
    started: float  # time.monotonic() (one clock for both processes) when the step began
    now: float  # ... and when its tokens were known
    scheduled: list[int]  # requests scheduled for the first time
    rows: list[tuple[int, int | None, str | None, int]]  # (seq_id, token or None, finish_reason, cached tokens)
    counts: EngineCounts
    prefix_queries: int  # this step's prompt tokens looked up in the prefix cache, and hit
    prefix_hits: int
    preemptions: int
    num_tokens: int  # tokens computed in the step (prefill chunks and decodes)
    cache_events: list[tuple[str, list[int]]] = field(default_factory=list)  # ("stored"|"removed", hashes)
    logprobs: dict[int, object] = field(default_factory=dict)  # seq_id -> its row's token_logprobs.TokenLogprobs
    prompt_logprobs: dict[int, list] = field(default_factory=dict)  # seq_id -> its prompt's, with its first token
    spec: tuple[int, int, int] = (0, 0, 0)  # speculative decoding in the step: drafts, draft tokens, accepted ones


def portable(e: BaseException) -> BaseException:
    """`e` if the server can re-raise it as it was, else a RuntimeError saying what it was. The server keeps
    torch out (common/torch_free.py), so only builtin exceptions and errors.py's travel as themselves: one
    whose class the server cannot import (torch's OutOfMemoryError) would not unpickle there."""
    if type(e).__module__ in ("builtins", errors.__name__):
        try:
            pickle.loads(pickle.dumps(e))
            return e
        except Exception:  # noqa: BLE001 - e.g. an exception class whose __init__ takes other arguments
            pass
    return RuntimeError(f"{type(e).__name__}: {e}")


def engine_process(model: str, engine_kwargs: dict, inbox: Connection, outbox: Connection) -> None:
    """The process's body: load, say ready (or why not), then serve the pipe until stopped."""
    # The server stops this process through the pipe, after its drain: a Ctrl-C or SIGTERM sent to the whole
    # process group must not cut the engine out from under requests that are still finishing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from nanoserve.engine_pod.llm_engine import LLMEngine

    try:
        engine = LLMEngine(model, **engine_kwargs)
    except BaseException as e:
        outbox.send(("failed", portable(e)))
        raise SystemExit(1) from None
    freeze_heap()  # torch's and the model's objects: the step loop's collections need not walk them
    try:
        outbox.send(("ready", EngineInfo(engine.config, engine.block_manager.num_blocks)))
        EngineCore(engine, outbox).run(inbox)
    finally:
        engine.exit()


class EngineCore:
    def __init__(self, engine, outbox: Connection):
        self.engine = engine
        self.out = outbox
        self.unscheduled: set[int] = set()  # added, never scheduled yet (the queue-time metric)
        self.received = 0
        self.subscribers: set[int] = set()
        self.compiling: dict[int, concurrent.futures.Future] = {}  # constrained requests, by seq_id
        self.compile_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="grammar")
        self.last_counts: EngineCounts | None = None
        self.scoring: set[int] = set()  # unfinished requests that want logprobs or prompt logprobs
        self.prompts_scored: set[int] = set()  # ... whose prompt logprobs have been sent
        engine.block_manager.record_events = True

    def run(self, inbox: Connection) -> None:
        try:
            while True:
                try:
                    while inbox.poll():
                        if not self._handle(inbox.recv()):
                            return
                except (EOFError, OSError):
                    return  # the server is gone
                if self.compiling:
                    self._admit_compiled()
                if not self.engine.has_unfinished():
                    self.engine.check()  # a dead tensor-parallel worker fails the engine even while idle
                    self._send_counts()
                    inbox.poll(0.005 if self.compiling else 0.5)
                    continue
                self._step()
        except BaseException as e:  # a broken engine fails every request instead of hanging them
            logging.getLogger("nanoserve.engine").exception("engine step failed")
            with contextlib.suppress(OSError):  # (the server may be what failed)
                self.out.send(("failed", portable(e)))
            raise SystemExit(1) from None
        finally:
            self.compile_pool.shutdown(wait=False, cancel_futures=True)

    def _handle(self, msg: tuple) -> bool:
        kind = msg[0]
        if kind == "add":
            _, seq_id, token_ids, params, arrival = msg
            self.received += 1
            # The server has run the admission checks (admission.py, the prompt ids' range): not again here.
            if params.structured_outputs is None:
                self._add(self.engine.checked_sequence(token_ids, params, seq_id, arrival))
            else:
                self.compiling[seq_id] = self.compile_pool.submit(
                    self.engine.checked_sequence, token_ids, params, seq_id, arrival
                )
        elif kind == "abort":
            seq_id = msg[1]
            if seq_id in self.compiling:
                self.compiling.pop(seq_id).cancel()
            else:
                self.unscheduled.discard(seq_id)
                self.scoring.discard(seq_id)
                self.prompts_scored.discard(seq_id)
                self.engine.abort(seq_id)
        elif kind == "subscribe":
            self.subscribers.add(msg[1])
            self.out.send(("snapshot", msg[1], self.engine.block_manager.cached_hashes()))
        elif kind == "unsubscribe":
            self.subscribers.discard(msg[1])
        elif kind == "stop":
            return False
        return True

    def _add(self, seq) -> None:
        self.engine.add_sequence(seq)
        self.unscheduled.add(seq.seq_id)
        if seq.params.logprobs is not None or seq.params.prompt_logprobs is not None:
            self.scoring.add(seq.seq_id)

    def _admit_compiled(self) -> None:
        for seq_id, future in list(self.compiling.items()):
            if not future.done():
                continue
            del self.compiling[seq_id]
            try:
                seq = future.result()
            except Exception as e:  # noqa: BLE001 - an invalid schema: the server answers 400 with it
                self.out.send(("rejected", seq_id, portable(e)))
                continue
            self._add(seq)
            self.out.send(("admitted", seq_id))

    def _counts(self) -> EngineCounts:
        sched, bm = self.engine.scheduler, self.engine.block_manager
        return EngineCounts(len(sched.waiting) + len(self.compiling), len(sched.running), bm.usage(), self.received)

    def _logprobs(self, sampled) -> tuple[dict, dict]:
        """This step's logprobs, and the prompt logprobs of requests that got their first token."""
        logprobs, prompt_logprobs = {}, {}
        for seq, token in sampled:
            if seq.params.logprobs is not None and token is not None:
                logprobs[seq.seq_id] = seq.logprobs[-1]
            if seq.params.prompt_logprobs is not None and seq.seq_id not in self.prompts_scored:
                prompt_logprobs[seq.seq_id] = seq.prompt_logprobs
                self.prompts_scored.add(seq.seq_id)
            if seq.is_finished:
                self.prompts_scored.discard(seq.seq_id)
                self.scoring.discard(seq.seq_id)
        return logprobs, prompt_logprobs

    def _send_counts(self) -> None:
        counts = self._counts()
        if counts != self.last_counts:
            self.last_counts = counts
            self.out.send(("counts", counts))

    def _step(self) -> None:
        engine, bm = self.engine, self.engine.block_manager
        queries, hits, preemptions = bm.prefix_queries, bm.prefix_hits, engine.scheduler.num_preemptions
        spec = engine.spec_stats
        drafts, draft_tokens, accepted = spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens
        started = time.monotonic()
        batch, sampled = engine.run_step()
        now = time.monotonic()
        scheduled = []
        if self.unscheduled:
            scheduled = [seq.seq_id for seq, _ in batch if seq.seq_id in self.unscheduled]
            self.unscheduled.difference_update(scheduled)
        # A verify step gives a sequence several tokens in order: only its last row carries its finish.
        last = {seq.seq_id: i for i, (seq, _) in enumerate(sampled)}
        rows = [
            (seq.seq_id, token, seq.finish_reason if last[seq.seq_id] == i else None, seq.num_cached_tokens)
            for i, (seq, token) in enumerate(sampled)
        ]
        logprobs, prompt_logprobs = self._logprobs(sampled) if self.scoring else ({}, {})
        events = _runs(bm.events) if self.subscribers else []  # in order: a hash can be evicted and stored again
        bm.events.clear()
        self.last_counts = counts = self._counts()
        self.out.send(
            (
                "step",
                StepOutput(
                    started,
                    now,
                    scheduled,
                    rows,
                    counts,
                    bm.prefix_queries - queries,
                    bm.prefix_hits - hits,
                    engine.scheduler.num_preemptions - preemptions,
                    sum(n for _, n in batch),
                    events,
                    logprobs,
                    prompt_logprobs,
                    (
                        spec.num_drafts - drafts,
                        spec.num_draft_tokens - draft_tokens,
                        spec.num_accepted_tokens - accepted,
                    ),
                ),
            )
        )


def _runs(events: list[tuple[str, int]]) -> list[tuple[str, list[int]]]:
    """Group consecutive events of the same kind: [("stored", [h1, h2]), ("removed", [h3]), ...]."""
    runs: list[tuple[str, list[int]]] = []
    for kind, h in events:
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(h)
        else:
            runs.append((kind, [h]))
    return runs
