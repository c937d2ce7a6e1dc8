"""The server's side of the engine: the engine core runs in a process of its own (engine_core.py); this class
starts it, sends it requests and aborts, and turns its one message a step into each request's TokenDeltas
and the Prometheus metrics, on the event loop.

Both pipes are served by threads: sending (a pipe that is full while the engine runs a long step must not
block the event loop) and receiving (one loop wake-up a message, i.e. a step). A streamed request's tokens go to its
queue as they come; a non-streamed one's come in one delta when it finishes (no loop work per token). An engine that
fails, by a fault it reports or a process that dies, ends every open request with the error at once.
"""

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from nanoserve.engine_pod.admission import check_request
from nanoserve.engine_pod.config import Config
from nanoserve.engine_pod.engine_core import EngineCounts, EngineInfo, StepOutput, engine_process
from nanoserve.engine_pod.engine_request import EngineRequest, TokenDelta
from nanoserve.engine_pod.errors import EngineDeadError
from nanoserve.engine_pod.metrics import EngineMetrics
from nanoserve.engine_pod.sampling_params import SamplingParams
from nanoserve.engine_pod.tp_workers import describe_exit

_GONE_CHECK_S = 1.0  # how often a waiting request checks that its client is still there


@dataclass
class FeedDelta:
    """A cache-feed event for the subscribers' queues (the prefix-cache feed, gateway_api.cache_events)."""

    kind: str  # snapshot | stored | removed
    hashes: list[int]
    sse: bytes | None = None  # its server-sent event, once the first subscriber has encoded it


class AsyncEngine:
    def __init__(self, model: str, engine_kwargs: dict, model_name: str):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA and threads do not survive fork
        self._in_r, self._in_w = ctx.Pipe(duplex=False)  # server -> engine
        self._out_r, self._out_w = ctx.Pipe(duplex=False)  # engine -> server
        self.process = ctx.Process(
            target=engine_process, args=(model, engine_kwargs, self._in_r, self._out_w), name="nanoserve-engine"
        )
        self.model_name = model_name
        self.metrics: EngineMetrics  # made once the engine is loaded (buckets by max_model_len)
        self.info: EngineInfo | None = None
        self.error: BaseException | None = None
        self.requests: dict[int, EngineRequest] = {}
        self.subscribers: dict[int, asyncio.Queue] = {}  # cache-feed queues, by id (live once their snapshot came)
        self._new_subscribers: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count()
        self._stopping = False
        self.num_sent = 0  # "add" messages sent: those the engine has not read yet count as waiting
        self.counts = EngineCounts(0, 0, 0.0, 0)
        self.prefix_queries = self.prefix_hits = 0  # so far (the V0 hit-rate gauge)
        self.prompt_tokens_total = self.generation_tokens_total = 0  # so far (the periodic stats line)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="engine-pipe-out", daemon=True)
        self._receiver = threading.Thread(target=self._recv_loop, name="engine-pipe-in", daemon=True)

    @property
    def loaded(self) -> EngineInfo:
        """What the loaded engine reported (the server calls nothing that needs it before start() returned)."""
        if self.info is None:
            raise RuntimeError("the engine has not loaded yet")
        return self.info

    @property
    def config(self) -> Config:
        return self.loaded.config

    @property
    def num_waiting(self) -> int:
        return self.counts.waiting + self.num_sent - self.counts.received

    async def start(self) -> None:
        """Start the engine core process; return once its model is loaded, or raise what failed the load."""
        self.loop = asyncio.get_running_loop()
        self.failed = asyncio.Event()  # set when the engine has failed (self.error says why)
        self._ready = self.loop.create_future()
        self.process.start()
        self._in_r.close()  # the engine's ends: copies left open here would keep its death from reading as EOF
        self._out_w.close()
        self._sender.start()
        self._receiver.start()
        await self._ready

    async def stop(self, timeout: float = 30) -> None:
        """Stop the engine core (it finishes its teardown, tensor-parallel workers included)."""
        self._stopping = True  # its pipe closing now is no failure
        if self.process.is_alive():
            if self.info is None:  # still loading: it reads no message until it has loaded
                self.process.kill()
            self._send(("stop",))
            await asyncio.to_thread(self.process.join, timeout)
            if self.process.is_alive():
                self.process.kill()
                await asyncio.to_thread(self.process.join, 5)
        self._outbox.put(None)

    # ---- requests -----------------------------------------------------------------------------
    async def submit(self, prompt_ids: list[int], params: SamplingParams, stream: bool = True) -> EngineRequest:
        """Send a request to the engine core. InvalidRequestError if it could never be served (for a
        constrained one, also if its grammar does not compile). Every submitted request must be released."""
        cfg = self.config
        check_request(
            prompt_ids,
            params,
            cfg.max_model_len,
            cfg.kvcache_block_size,
            self.loaded.num_blocks,
            cfg.hf_config["vocab_size"],
        )
        if self.error is not None:
            raise self.error
        req = EngineRequest(next(self._ids), len(prompt_ids), time.monotonic(), stream)  # the engine's clock too
        if params.structured_outputs is not None:
            req.admitted = self.loop.create_future()
        self.requests[req.seq_id] = req
        self.num_sent += 1  # waiting from now: back-pressure sees a burst before the engine does
        self._send(("add", req.seq_id, prompt_ids, params, req.arrival))
        if req.admitted is not None:
            try:
                await req.admitted
            except BaseException:  # rejected (already gone), or the client left while its grammar compiled
                self.release(req)
                raise
        return req

    async def generate(self, req: EngineRequest, gone: Callable[[], bool] | None = None) -> AsyncIterator[TokenDelta]:
        """Yield TokenDelta as tokens arrive (one at the end unless streamed). Tokens that arrived while the
        caller was busy come as one delta (one SSE event, not one per token). Returns early when `gone()`
        turns true (the client left); an engine failure is raised."""
        out = req.out
        while True:
            if out.empty():
                try:
                    delta = await asyncio.wait_for(out.get(), _GONE_CHECK_S)
                except TimeoutError:
                    if gone is not None and gone():
                        return
                    continue
            else:
                delta = out.get_nowait()
            while not isinstance(delta, BaseException) and delta.finish_reason is None and not out.empty():
                more = out.get_nowait()
                if isinstance(more, BaseException):
                    delta = more
                    break
                delta = delta.then(more)
            if isinstance(delta, BaseException):
                raise delta
            yield delta
            if delta.finish_reason is not None:
                return

    def release(self, req: EngineRequest) -> None:
        """Done with `req`: abort it if it has not finished (the client left, or the server gave up)."""
        if req.finished:
            return
        req.finished = True
        if self.requests.pop(req.seq_id, None) is not None and self.error is None:
            self._send(("abort", req.seq_id))
            self._labeled("request_success", finished_reason="abort").inc()

    def end_all(self, error: BaseException) -> None:
        """Every open request ends now with `error` (raised in its generate()): a drain out of time."""
        for req in self.requests.values():
            req.out.put_nowait(error)

    def subscribe_cache_events(self) -> asyncio.Queue:
        """A queue that first gets FeedDelta("snapshot", hashes), then "stored" or "removed" ones."""
        q: asyncio.Queue = asyncio.Queue()
        sub_id = next(self._ids)
        self._new_subscribers[sub_id] = q
        self._send(("subscribe", sub_id))
        return q

    def unsubscribe_cache_events(self, q: asyncio.Queue) -> None:
        for subs in (self.subscribers, self._new_subscribers):
            for sub_id in [i for i, sq in subs.items() if sq is q]:
                del subs[sub_id]
                self._send(("unsubscribe", sub_id))

    # ---- the pipes ----------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        self._outbox.put(msg)

    def _send_loop(self) -> None:
        while (msg := self._outbox.get()) is not None:
            try:
                self._in_w.send(msg)
            except OSError:  # the engine is gone: the reader reports it
                return

    def _recv_loop(self) -> None:
        """Blocking reads on a thread of their own: a loop's add_reader would make the pipe non-blocking (uvloop
        does), and a message still being written (a large cache snapshot) would then read as a broken pipe."""
        try:
            while True:
                self.loop.call_soon_threadsafe(self._dispatch, self._out_r.recv())
        except (EOFError, OSError):
            if self._stopping:
                return
            self.process.join(1)  # it has closed its pipe: it is exiting
            code = self.process.exitcode
            how = "is still running" if code is None else f"exited ({describe_exit(code)})"
            error = EngineDeadError(f"the engine core process (pid {self.process.pid}) closed its pipe and {how}")
        except Exception as e:  # noqa: BLE001 - a message that does not unpickle here (engine_core.portable)
            logging.getLogger("nanoserve.engine").exception("unreadable message from the engine core")
            error = EngineDeadError(f"the engine core sent a message this server cannot read: {e!r}")
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is done anyway
            self.loop.call_soon_threadsafe(self._fail, error)

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            self._on_step(msg[1])
        elif kind == "counts":
            self._on_counts(msg[1])
        elif kind == "admitted":
            req = self.requests.get(msg[1])
            if req is not None and req.admitted is not None and not req.admitted.done():
                req.admitted.set_result(None)
        elif kind == "rejected":
            req = self.requests.pop(msg[1], None)
            if req is not None:
                req.finished = True
                if req.admitted is not None and not req.admitted.done():
                    req.admitted.set_exception(msg[2])
                else:
                    req.out.put_nowait(msg[2])
        elif kind == "snapshot":
            q = self._new_subscribers.pop(msg[1], None)
            if q is not None:
                self.subscribers[msg[1]] = q
                q.put_nowait(FeedDelta("snapshot", msg[2]))
        elif kind == "ready":
            self.info = info = msg[1]
            cfg = info.config
            self.metrics = EngineMetrics(
                self.model_name,
                cfg.max_model_len,
                cfg.kvcache_block_size,
                info.num_blocks,
                cfg.enable_prefix_caching,
                cfg.kv_cache_dtype,
            )
            self._ready.set_result(None)
        elif kind == "failed":
            self._fail(msg[1])

    def _fail(self, error: BaseException) -> None:
        if self.error is not None:
            return
        self.error = error
        for req in self.requests.values():
            if req.admitted is not None and not req.admitted.done():
                req.admitted.set_exception(error)
            else:
                req.out.put_nowait(error)
        if not self._ready.done():
            self._ready.set_exception(error)
        self.failed.set()

    # ---- a step's output ----------------------------------------------------------------------
    def _labeled(self, name: str, **labels):
        return self.metrics.labeled(name, **labels)

    def _on_step(self, out: StepOutput) -> None:
        m, now = self._labeled, out.now
        for seq_id in out.scheduled:
            req = self.requests.get(seq_id)
            if req is not None:
                req.scheduled_at = out.started
                m("request_queue_time").observe(out.started - req.arrival)
                m("prompt_tokens").inc(req.num_prompt_tokens)
                self.prompt_tokens_total += req.num_prompt_tokens
        if out.num_tokens:
            m("iteration_tokens").observe(out.num_tokens)
        generated = 0
        ttft, itl, tpot = m("time_to_first_token"), m("inter_token_latency"), m("time_per_output_token")
        for seq_id, token, finish, cached in out.rows:
            req = self.requests.get(seq_id)
            if req is None:  # released while this step ran
                continue
            if req.last_token_at is None:
                req.first_token_at = now
                ttft.observe(now - req.arrival)
            else:
                itl.observe(now - req.last_token_at)
                tpot.observe(now - req.last_token_at)
            req.last_token_at = now
            if token is not None:  # None: a grammar that allowed no token ended it
                generated += 1
            logprobs = out.logprobs.get(seq_id) if out.logprobs else None
            if out.prompt_logprobs and seq_id in out.prompt_logprobs:
                req.prompt_logprobs = out.prompt_logprobs[seq_id]
            req.deliver(token, finish, cached, logprobs)
            if finish is not None:
                del self.requests[seq_id]
                self.metrics.finished(
                    finish,
                    req.arrival,
                    req.scheduled_at,
                    req.first_token_at,
                    now,
                    req.num_prompt_tokens,
                    req.num_generated,
                )
        m("generation_tokens").inc(generated)
        self.generation_tokens_total += generated
        m("prefix_cache_queries").inc(out.prefix_queries)
        m("prefix_cache_hits").inc(out.prefix_hits)
        if out.prefix_queries:
            self.prefix_queries += out.prefix_queries
            self.prefix_hits += out.prefix_hits
            m("gpu_prefix_cache_hit_rate").set(self.prefix_hits / self.prefix_queries)
        m("num_preemptions").inc(out.preemptions)
        if out.spec[0]:
            m("spec_decode_num_drafts").inc(out.spec[0])
            m("spec_decode_num_draft_tokens").inc(out.spec[1])
            m("spec_decode_num_accepted_tokens").inc(out.spec[2])
        self._on_counts(out.counts)
        for kind, hashes in out.cache_events:
            delta = FeedDelta(kind, hashes)  # one object in every queue: encoded once (gateway_api), not per gateway
            for q in self.subscribers.values():
                q.put_nowait(delta)

    def _on_counts(self, counts: EngineCounts) -> None:
        self.counts = counts
        self._labeled("num_requests_waiting").set(counts.waiting)
        self._labeled("num_requests_running").set(counts.running)
        self._labeled("kv_cache_usage_perc").set(counts.kv_usage)
        self._labeled("gpu_cache_usage_perc").set(counts.kv_usage)
