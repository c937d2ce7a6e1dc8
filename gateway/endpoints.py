"""Engine endpoints as the gateway sees them: discovery state, health, load, tokenizer and cache indexes."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

from nanoserve.gateway.breaker import Breaker
from nanoserve.gateway.cache_index import CacheIndex
from nanoserve.gateway.config import GatewayConfig
from nanoserve.gateway.policy import Candidate
from nanoserve.gateway.prompt import TEXT_CHUNK, Prompt, PromptTokenizer


def engine_id(url: str) -> str:
    """The name clients see for an engine (the X-Nanoserve-Engine header): a short hash of its URL, the
    same in every gateway replica, that does not show the cluster's addresses."""
    return "engine-" + hashlib.sha256(url.encode()).hexdigest()[:12]


@dataclass
class Endpoint:
    url: str
    cache: CacheIndex  # the engine's prefix cache, in its block hashes (precise with its feed)
    # Prompts routed here, as text chunks: steers routing while no tokenizer is verified.
    text_cache: CacheIndex = field(default_factory=lambda: CacheIndex(TEXT_CHUNK))
    ready: bool = True  # discovery's view (EndpointSlice "ready" condition)
    healthy: bool = False  # active checks' view; unknown until the first probe answers
    successes: int = 0  # consecutive good probes
    failures: int = 0  # consecutive failed probes
    in_flight: int = 0  # requests this gateway has open on it
    engine_busy: int = 0  # running + waiting, from the engine's /metrics
    metrics_at: float = -1e9  # time.monotonic() of that scrape
    tokenizer: PromptTokenizer | None = None  # the engine's own, verified (gateway/tokenizers.py)
    tokenizer_settled: bool = False  # its first fetch has ended (verified or refused): see Gateway.ready
    breaker: Breaker = field(default_factory=Breaker)  # requests' view: consecutive failures

    @property
    def id(self) -> str:
        return engine_id(self.url)

    @property
    def routable(self) -> bool:
        return self.ready and self.healthy and self.breaker.available()

    def load(self, metrics_max_age: float, now: float | None = None) -> int:
        """In-flight requests. A fresh engine count also includes other gateways' requests, so take the
        larger of the two (adding them would count this gateway's requests twice)."""
        now = time.monotonic() if now is None else now
        if now - self.metrics_at <= metrics_max_age:
            return max(self.in_flight, self.engine_busy)
        return self.in_flight

    def probe_ok(self, healthy_threshold: int) -> None:
        self.failures = 0
        self.successes += 1
        if not self.healthy and self.successes >= healthy_threshold:
            self.healthy = True

    def probe_failed(self, unhealthy_threshold: int) -> None:
        self.successes = 0
        self.failures += 1
        if self.healthy and self.failures >= unhealthy_threshold:
            self.mark_down()

    def mark_down(self) -> None:
        """Stop routing here until probes succeed again. A restarted engine starts with a cold cache, and
        may serve another model: its tokenizer is fetched again."""
        self.healthy = False
        self.successes = 0
        self.cache.feed_lost()
        self.text_cache.feed_lost()
        self.tokenizer = None

    def record(self, prompt: Prompt, mode: str) -> None:
        """Remember a prompt routed here (approximate and pending entries of the indexes)."""
        if mode == "tokens":
            self.cache.record(prompt.hashes(self.cache.block_size, self.tokenizer))
        self.text_cache.record(prompt.text_hashes())


def routing_mode(endpoints: list[Endpoint], prompt: Prompt | None) -> str:
    """How a request is matched against these engines' caches: "tokens" when its ids are known for every
    engine (the engines' tokenizers are verified, or the client sent ids), else "text"; "none" without a
    prompt (a policy that ignores caches)."""
    if prompt is None:
        return "none"
    if all(prompt.ids_for(ep.tokenizer) is not None for ep in endpoints):
        return "tokens"
    return "text"


@dataclass
class EndpointPool:
    config: GatewayConfig
    endpoints: dict[str, Endpoint] = field(default_factory=dict)

    def set_targets(self, targets: dict[str, bool]) -> tuple[list[Endpoint], list[Endpoint]]:
        """Replace the target list ({url: ready}); returns (added, removed) endpoints."""
        added, removed = [], []
        for url in list(self.endpoints):
            if url not in targets:
                removed.append(self.endpoints.pop(url))
        for url, ready in targets.items():
            ep = self.endpoints.get(url)
            if ep is None:
                cfg = self.config
                ep = Endpoint(
                    url,
                    CacheIndex(cfg.block_size, cfg.approx_capacity_blocks, cfg.pending_ttl),
                    CacheIndex(TEXT_CHUNK, cfg.approx_capacity_blocks),
                    breaker=Breaker(cfg.breaker_threshold, cfg.breaker_cooldown, cfg.breaker_max_cooldown),
                )
                self.endpoints[url] = ep
                added.append(ep)
            ep.ready = ready
        return added, removed

    def routable(self) -> list[Endpoint]:
        return [ep for ep in self.endpoints.values() if ep.routable]

    def by_id(self, id_: str) -> Endpoint | None:
        """The endpoint an X-Nanoserve-Engine header names."""
        return next((ep for ep in self.endpoints.values() if ep.id == id_), None)

    def candidates(self, endpoints: list[Endpoint], prompt: Prompt | None, mode: str) -> list[Candidate]:
        """Policy inputs: each engine's load and its match of the prompt, in the engine's own cache blocks
        (mode "tokens") or in the text-prefix index ("text")."""
        now = time.monotonic()
        out = []
        for ep in endpoints:
            index = ep.text_cache if mode == "text" else ep.cache
            if prompt is not None and mode == "tokens":
                hashes = prompt.hashes(ep.cache.block_size, ep.tokenizer)
            else:
                hashes = prompt.text_hashes() if prompt is not None and mode == "text" else []
            out.append(
                Candidate(
                    ep.url, ep.load(self.config.metrics_max_age, now), index.match(hashes), len(hashes), len(index)
                )
            )
        return out
