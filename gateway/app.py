"""The gateway application: state, background tasks, routes; `run_gateway` serves it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import signal
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from nanoserve.common.gc_heap import freeze_heap
from nanoserve.common.http_logs import quiet_client_faults
from nanoserve.common.ports import LISTEN_BACKLOG
from nanoserve.gateway.activator import Activator, ScaleClient
from nanoserve.gateway.cache_feed import follow_feed
from nanoserve.gateway.config import GatewayConfig
from nanoserve.gateway.discovery import EndpointSliceWatcher, Targets, static_targets
from nanoserve.gateway.endpoints import Endpoint, EndpointPool
from nanoserve.gateway.errors import error_response
from nanoserve.gateway.health import watch_engine
from nanoserve.gateway.metrics import GatewayMetrics
from nanoserve.gateway.middleware import middlewares
from nanoserve.gateway.policy import make_policy
from nanoserve.gateway.prompt import PromptTokenizer, load_tokenizer
from nanoserve.gateway.proxy import handle_generate
from nanoserve.gateway.tokenizers import TokenizerError, Tokenizers, follow_tokenizer

log = logging.getLogger(__name__)

UPSTREAM_KEEPALIVE = 60.0  # seconds an idle connection to an engine is kept


class Gateway:
    def __init__(self, config: GatewayConfig, tokenizer: PromptTokenizer | None = None) -> None:
        self.config = config
        self.pool = EndpointPool(config)
        self.policy = make_policy(config.policy, config.routing)
        self.metrics = GatewayMetrics()
        # --model's local copy (still checked against each engine's fingerprint) and the engines' own.
        self.tokenizers = Tokenizers(tokenizer)
        self.mode = ""  # the routing mode last logged (routing_mode_now)
        self.url: str | None = None  # set by serve()
        # Made in start() (a session belongs to the running loop): proxied requests, with the client's own
        # headers; and the gateway's own calls (probes, feeds, /v1/models).
        self.session: aiohttp.ClientSession
        self.control: aiohttp.ClientSession
        self._sessions: list[aiohttp.ClientSession] = []
        self._engine_tasks: dict[str, list[asyncio.Task]] = {}
        self._discovery: asyncio.Task | None = None
        self._background: list[asyncio.Task] = []
        self.activator: Activator | None = None  # --scale-target

    async def start(self) -> None:
        if self.tokenizers.local is None and self.config.model:
            self.tokenizers = Tokenizers(await asyncio.to_thread(load_tokenizer, self.config.model))
        elif self.policy.uses_cache:  # the engines' tokenizers will need transformers: import it while they start
            self._background.append(asyncio.ensure_future(asyncio.to_thread(importlib.import_module, "transformers")))
        self.log_mode()
        # auto_decompress off: bodies pass through byte for byte, with their Content-Encoding. Idle connections
        # to the engines are kept a minute (aiohttp's default: 15 s; engine servers keep theirs 75 s or more):
        # traffic in bursts then finds them open instead of connecting once per request of the next burst.
        # No cookie jar: an engine's Set-Cookie is the client's, never sent on with other clients' requests.
        self.session = aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        key = self.config.engine_api_key
        self.control = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {key}"} if key else None,
            connector=aiohttp.TCPConnector(limit=0),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._sessions = [self.session, self.control]
        if self.config.service:
            watcher = EndpointSliceWatcher(
                self.config.service, self.config.namespace, self.set_targets, self.config.port_name, self.config.scheme
            )
            watcher.connect()
            self._discovery = asyncio.create_task(watcher.run())
        else:
            self.set_targets(static_targets(self.config.engines))
        if self.config.scale_target:
            scale = ScaleClient(self.config.scale_target, self.config.namespace)
            self.activator = Activator(self.pool, scale, self.config, self.metrics)
            if self.config.scale_to_zero_after > 0:
                self._background.append(asyncio.create_task(self.activator.run_idle_scaler()))
        if self.metrics.multiprocess_dir:  # a worker of several: keep its share of the shared gauges current
            self._background.append(asyncio.create_task(self._refresh_metrics()))

    async def _refresh_metrics(self) -> None:
        while True:
            self.metrics.refresh(self.pool, self.routing_mode_now())
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        tasks = [t for ts in self._engine_tasks.values() for t in ts]
        if self._discovery is not None:
            tasks.append(self._discovery)
        tasks += self._background
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._engine_tasks.clear()
        for session in self._sessions:
            await session.close()

    def set_targets(self, targets: Targets) -> None:
        """New engine list from discovery: start watching new engines, stop watching removed ones."""
        added, removed = self.pool.set_targets(targets)
        for ep in removed:
            for t in self._engine_tasks.pop(ep.url, []):
                t.cancel()
        for ep in added:
            self._engine_tasks[ep.url] = self._watch(ep)
        if added or removed:
            log.info("engines: %s", sorted(self.pool.endpoints))
            self.tokenizer_changed(None, None)

    def _watch(self, ep: Endpoint) -> list[asyncio.Task]:
        cfg = self.config
        tasks = [asyncio.create_task(watch_engine(self.control, ep, cfg))]
        if self.policy.uses_cache:
            tasks.append(
                asyncio.create_task(
                    follow_feed(self.control, ep.url, ep.cache, cfg.feed_retry_interval, cfg.feed_idle_timeout)
                )
            )
            tasks.append(
                asyncio.create_task(
                    follow_tokenizer(
                        self.control,
                        ep,
                        self.tokenizers,
                        cfg.health_interval,
                        cfg.tokenizer_retry_interval,
                        self.tokenizer_changed,
                    )
                )
            )
        return tasks

    @property
    def tokenizer(self) -> PromptTokenizer | None:
        """The local tokenizer (--model), if any."""
        return self.tokenizers.local

    def tokenizer_changed(self, ep: Endpoint | None, error: TokenizerError | None) -> None:
        if error is not None and ep is not None:
            log.warning("engine %s: no usable tokenizer (%s): %s", ep.url, error.reason, error)
            self.metrics.tokenizer_errors.labels(error.reason).inc()
        elif ep is not None and ep.tokenizer is not None:
            log.info(
                "engine %s: tokenizer %s verified (from %s), block size %d",
                ep.url,
                ep.tokenizer.fingerprint[:12],
                ep.tokenizer.source,
                ep.cache.block_size,
            )
        self.tokenizers.prune({e.tokenizer.fingerprint for e in self.pool.endpoints.values() if e.tokenizer})
        self.log_mode()

    def routing_mode_now(self) -> str:
        """tokens: every engine's prefix cache is matched in its own token blocks; text: some engine has no
        verified tokenizer, so prompts are matched by text prefix; load: the policy ignores caches."""
        if not self.policy.uses_cache:
            return "load"
        eps = self.pool.routable() or list(self.pool.endpoints.values())
        return "tokens" if eps and all(ep.tokenizer is not None for ep in eps) else "text"

    def log_mode(self) -> None:
        mode = self.routing_mode_now()
        if mode != self.mode:
            self.mode = mode
            without = sorted(ep.url for ep in self.pool.endpoints.values() if ep.tokenizer is None)
            log.info(
                "routing mode: %s%s",
                mode,
                f" (no verified tokenizer yet: {without})" if mode == "text" and without else "",
            )

    # Routes.

    async def models(self, request: web.Request) -> web.Response:
        """Union of the engines' model lists (by id)."""

        async def fetch(ep: Endpoint) -> list[dict]:
            try:
                timeout = aiohttp.ClientTimeout(total=self.config.health_timeout)
                async with self.control.get(ep.url + "/v1/models", timeout=timeout, allow_redirects=False) as resp:
                    body = await resp.json() if resp.status == 200 else {}
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError, RecursionError):
                return []
            data = body.get("data") if isinstance(body, dict) else None  # an engine's garbage is skipped
            return (
                [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
                if isinstance(data, list)
                else []
            )

        results = await asyncio.gather(*(fetch(ep) for ep in self.pool.routable()))
        merged: dict[str, dict] = {}
        for data in results:
            for model in data:
                merged.setdefault(model["id"], model)
        if not merged:
            return error_response(503, "no healthy engine", "server_error", "no_healthy_engine")
        return web.json_response({"object": "list", "data": list(merged.values())})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def tokenizers_pending(self, endpoints: list[Endpoint]) -> int:
        """Engines whose tokenizer is still being fetched for the first time (none if routing ignores caches)."""
        return sum(not ep.tokenizer_settled for ep in endpoints) if self.policy.uses_cache else 0

    def ready_now(self) -> tuple[bool, int, int]:
        """(ready, routable engines, tokenizers pending). Ready once some engine is routable and its tokenizer
        settled: loading a tokenizer (transformers' import, the files) holds the GIL for seconds, which
        requests arriving meanwhile would wait out."""
        endpoints = self.pool.routable()
        pending = self.tokenizers_pending(endpoints)
        if self.activator is not None and not endpoints:
            return True, 0, 0  # ready to take the requests that wake the service from zero
        return len(endpoints) > pending, len(endpoints), pending

    async def until_ready(self) -> None:
        while not self.ready_now()[0]:
            await asyncio.sleep(0.05)

    async def ready(self, request: web.Request) -> web.Response:
        ok, engines, pending = self.ready_now()
        body = {"ready": ok, "engines": engines, "tokenizers_pending": pending}
        return web.json_response(body, status=200 if ok else 503)

    def metrics_text(self) -> bytes:
        return self.metrics.render(self.pool, self.routing_mode_now())

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics_text(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )


GATEWAY = web.AppKey("gateway", Gateway)
WORKER_READY_TIMEOUT = 10.0  # seconds a worker of several waits to be ready before it listens anyway


def build_app(config: GatewayConfig, tokenizer: PromptTokenizer | None = None) -> web.Application:
    """The aiohttp app; background tasks start and stop with it. app[GATEWAY] is the Gateway."""
    gw = Gateway(config, tokenizer)
    app = web.Application(middlewares=middlewares(config), client_max_size=config.max_body_bytes)
    app[GATEWAY] = gw
    # (pyright checks this file as gateway.app and sees proxy's Gateway as nanoserve.gateway.app's: one class)
    generate = functools.partial(handle_generate, gw)  # pyright: ignore[reportArgumentType]
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_get("/v1/models", gw.models)
    app.router.add_get("/health", gw.health)
    app.router.add_get("/ready", gw.ready)
    app.router.add_get("/metrics", gw.prometheus)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await gw.start()
        yield
        await gw.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


@contextlib.asynccontextmanager
async def serve(config: GatewayConfig, tokenizer: PromptTokenizer | None = None) -> AsyncIterator[Gateway]:
    """Serve the gateway inside an `async with`; yields the Gateway, its base URL in `.url`
    (port 0 picks a free port)."""
    app = build_app(config, tokenizer)
    quiet_client_faults()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.drain_timeout)
    await runner.setup()  # (starts the Gateway: discovery, probes, feeds, tokenizers)
    if config.workers > 1:
        # A worker shares its port with the others, and the kernel sends it connections from its first
        # listen: it joins once it can route (bounded, so that /health answers for the liveness probe).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WORKER_READY_TIMEOUT):
                await app[GATEWAY].until_ready()
    site = web.TCPSite(runner, config.host, config.port, backlog=LISTEN_BACKLOG, reuse_port=config.workers > 1 or None)
    await site.start()
    port = runner.addresses[0][1]
    host = "127.0.0.1" if config.host in ("0.0.0.0", "") else config.host
    gw = app[GATEWAY]
    gw.url = f"http://{host}:{port}"
    try:
        yield gw
    finally:
        await runner.cleanup()


async def run_gateway(config: GatewayConfig) -> None:
    """Serve until cancelled, e.g. `asyncio.run(run_gateway(cfg))`. SIGTERM (Kubernetes) and SIGINT drain
    open requests for up to `drain_timeout` seconds."""
    task = asyncio.current_task()
    assert task is not None  # called from a task, as asyncio.run makes one
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not in the main thread / not on Unix
            loop.add_signal_handler(sig, task.cancel)
    async with serve(config) as gw:
        log.info(
            "gateway on %s, policy %s, engines %s",
            gw.url,
            config.policy,
            config.engines or f"service {config.namespace}/{config.service}",
        )
        # Once ready, the engines' tokenizer (transformers) is loaded: what exists then lives as long as we do.
        await gw.until_ready()
        freeze_heap()
        await asyncio.Event().wait()
