"""The engine behind the HTTP server: one thread owns the LLMEngine and steps it; coroutines submit
requests and await their tokens.

Everything that touches the engine (add, abort, the cache snapshot) goes through `inbox` and runs on the
engine thread between steps, so the scheduler and block manager need no locks. Results go back to the
event loop with `call_soon_threadsafe`. New requests join the running batch at the next step.
"""
import asyncio
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

from nanoserve.engine_pod.llm_engine import LLMEngine
from nanoserve.engine_pod.metrics import EngineMetrics
from nanoserve.engine_pod.sequence import Sequence


_GONE_CHECK_S = 1.0  # how often a waiting request checks that its client is still there and the engine alive


@dataclass
class TokenDelta:
    token_ids: list[int]
    finish_reason: str | None  # None while the request runs
    num_cached_tokens: int = 0


@dataclass
class _Request:
    seq: Sequence
    out: asyncio.Queue
    stream: bool = True  # False: the tokens come in one delta at the end (no event-loop work per token)
    held: list[int] | None = None  # a non-streamed request's tokens so far
    first_token_at: float | None = None
    last_token_at: float | None = None
    scheduled_at: float | None = None


class AsyncEngine:

    def __init__(self, engine: LLMEngine, metrics: EngineMetrics):
        self.engine = engine
        self.metrics = metrics
        self.loop: asyncio.AbstractEventLoop | None = None
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.requests: dict[int, _Request] = {}          # engine thread only
        self.subscribers: list[asyncio.Queue] = []       # cache-event feeds, engine thread only
        self.num_waiting = 0                             # written by the engine thread, read anywhere
        self._wake = threading.Event()
        self._stop = False
        self.error: BaseException | None = None
        self._open: set[asyncio.Queue] = set()          # the requests' output queues, event loop only
        engine.block_manager.record_events = True
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.failed = asyncio.Event()  # set when the engine thread has died (self.error says why)
        self.thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=30)

    def _send(self, fn, *args) -> None:
        self.inbox.put((fn, args))
        self._wake.set()

    # ---- called from the event loop -----------------------------------------------------------
    async def generate(self, seq: Sequence, stream: bool = True, gone: Callable[[], bool] | None = None):
        """Queue `seq` and yield TokenDelta as tokens arrive (stream=False: one delta when it finishes).
        Tokens that arrived while the caller was busy come as one delta (one SSE event, not one per token).
        Leaving early aborts the request, and so does `gone()` turning true (the client left) while waiting."""
        out: asyncio.Queue = asyncio.Queue()
        self._open.add(out)
        self.num_waiting += 1  # counted at once, so back-pressure sees a burst before the engine thread does
        self._send(self._add, _Request(seq, out, stream, None if stream else []))
        finished = False
        try:
            while not finished:
                try:
                    delta = await asyncio.wait_for(out.get(), _GONE_CHECK_S)
                except asyncio.TimeoutError:
                    if self.error is not None:  # the engine died with this request still in its inbox
                        raise self.error from None
                    if gone is not None and gone():
                        return
                    continue
                while not isinstance(delta, BaseException) and delta.finish_reason is None and not out.empty():
                    more = out.get_nowait()
                    if isinstance(more, BaseException):
                        delta = more
                        break
                    delta = TokenDelta(delta.token_ids + more.token_ids, more.finish_reason, more.num_cached_tokens)
                if isinstance(delta, BaseException):
                    raise delta
                finished = delta.finish_reason is not None
                yield delta
        finally:
            self._open.discard(out)
            if not finished:
                self._send(self._abort, seq.seq_id)

    def end_all(self, error: BaseException) -> None:
        """Every open request ends now with `error` (raised in its generate()): a drain out of time."""
        for out in self._open:
            out.put_nowait(error)

    async def subscribe_cache_events(self) -> asyncio.Queue:
        """A queue that first gets ("snapshot", hashes), then ("stored"|"removed", [hashes]) deltas."""
        q: asyncio.Queue = asyncio.Queue()
        self._send(self._subscribe, q)
        return q

    def unsubscribe_cache_events(self, q: asyncio.Queue) -> None:
        self._send(self._unsubscribe, q)

    # ---- engine thread ------------------------------------------------------------------------
    def _post(self, q: asyncio.Queue, item) -> None:
        self.loop.call_soon_threadsafe(q.put_nowait, item)

    def _post_all(self, items: list[tuple[asyncio.Queue, object]]) -> None:
        """Many results in one wake-up of the event loop (one per step, not one per token)."""
        if items:
            self.loop.call_soon_threadsafe(_deliver, items)

    def _add(self, req: _Request) -> None:
        self.requests[req.seq.seq_id] = req
        self.engine.add_sequence(req.seq)
        self.labeled("prompt_tokens").inc(req.seq.num_prompt_tokens)

    def _abort(self, seq_id: int) -> None:
        req = self.requests.pop(seq_id, None)
        if req is not None:
            self.engine.abort(seq_id)
            self.labeled("request_success", finished_reason="abort").inc()

    def _subscribe(self, q: asyncio.Queue) -> None:
        self.subscribers.append(q)
        self._post(q, ("snapshot", self.engine.block_manager.cached_hashes()))

    def _unsubscribe(self, q: asyncio.Queue) -> None:
        if q in self.subscribers:
            self.subscribers.remove(q)

    def labeled(self, name: str, **labels):
        return self.metrics.labeled(getattr(self.metrics, name), **labels)

    def _run(self) -> None:
        try:
            while not self._stop:
                while not self.inbox.empty():
                    fn, args = self.inbox.get()
                    fn(*args)
                if not self.engine.has_unfinished():
                    self.engine.check()  # a dead tensor-parallel worker fails the engine even while idle
                    self._publish_state()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._step()
        except BaseException as e:  # a broken engine fails every request instead of hanging them
            self.error = e
            for req in self.requests.values():
                self._post(req.out, e)
            self.loop.call_soon_threadsafe(self.failed.set)
            raise

    def _step(self) -> None:
        bm = self.engine.block_manager
        queries, hits, preemptions = bm.prefix_queries, bm.prefix_hits, self.engine.scheduler.num_preemptions
        started = time.monotonic()
        sampled = self.engine.step()
        now = time.monotonic()
        posts: list[tuple[asyncio.Queue, TokenDelta]] = []
        for seq, _ in self.engine.last_batch:
            req = self.requests.get(seq.seq_id)
            if req is not None and req.scheduled_at is None:
                req.scheduled_at = started
                self.labeled("request_queue_time").observe(started - seq.arrival)
        for seq, token in sampled:
            req = self.requests.get(seq.seq_id)
            if req is None:
                continue
            if req.first_token_at is None:
                req.first_token_at = now
                self.labeled("time_to_first_token").observe(now - seq.arrival)
            else:
                self.labeled("inter_token_latency").observe(now - req.last_token_at)
            req.last_token_at = now
            tokens = [] if token is None else [token]  # None: a grammar that allowed no token ended it
            self.labeled("generation_tokens").inc(len(tokens))
            if req.stream:
                posts.append((req.out, TokenDelta(tokens, seq.finish_reason, seq.num_cached_tokens)))
            else:
                req.held += tokens
                if seq.finish_reason is not None:
                    posts.append((req.out, TokenDelta(req.held, seq.finish_reason, seq.num_cached_tokens)))
            if seq.finish_reason is not None:
                del self.requests[seq.seq_id]
                self.labeled("request_success", finished_reason=seq.finish_reason).inc()
                self.labeled("e2e_request_latency").observe(now - seq.arrival)
        self._post_all(posts)
        self.labeled("prefix_cache_queries").inc(bm.prefix_queries - queries)
        self.labeled("prefix_cache_hits").inc(bm.prefix_hits - hits)
        self.labeled("num_preemptions").inc(self.engine.scheduler.num_preemptions - preemptions)
        self._publish_state()

    def _publish_state(self) -> None:
        sched, bm = self.engine.scheduler, self.engine.block_manager
        self.num_waiting = len(sched.waiting) + self.inbox.qsize()
        self.labeled("num_requests_waiting").set(len(sched.waiting))
        self.labeled("num_requests_running").set(len(sched.running))
        self.labeled("kv_cache_usage_perc").set(bm.usage())
        if bm.events:
            for kind, hashes in _runs(bm.events):  # in order: a hash can be evicted and stored again
                for q in self.subscribers:
                    self._post(q, (kind, hashes))
            bm.events.clear()


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _runs(events: list[tuple[str, int]]) -> list[tuple[str, list[int]]]:
    """Group consecutive events of the same kind: [("stored", [h1, h2]), ("removed", [h3]), ...]."""
    runs: list[tuple[str, list[int]]] = []
    for kind, h in events:
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(h)
        else:
            runs.append((kind, [h]))
    return runs
