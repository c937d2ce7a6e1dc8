"""Engine endpoints as the gateway sees them: discovery state, health, load and cache index."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from nanoserve.gateway.cache_index import CacheIndex
from nanoserve.gateway.config import GatewayConfig
from nanoserve.gateway.policy import Candidate
from nanoserve.gateway.prompt import Prompt


@dataclass
class Endpoint:
    url: str
    cache: CacheIndex
    ready: bool = True      # discovery's view (EndpointSlice "ready" condition)
    healthy: bool = False   # active checks' view; unknown until the first probe answers
    successes: int = 0      # consecutive good probes
    failures: int = 0       # consecutive failed probes
    in_flight: int = 0      # requests this gateway has open on it
    engine_busy: int = 0    # running + waiting, from the engine's /metrics
    metrics_at: float = -1e9  # time.monotonic() of that scrape
    kv_usage: float = 0.0

    @property
    def routable(self) -> bool:
        return self.ready and self.healthy

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
        """Stop routing here until probes succeed again; a restarted engine starts with a cold cache."""
        self.healthy = False
        self.successes = 0
        self.cache.reset()


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
                ep = Endpoint(url, CacheIndex(cfg.block_size, cfg.approx_capacity_blocks, cfg.pending_ttl))
                self.endpoints[url] = ep
                added.append(ep)
            ep.ready = ready
        return added, removed

    def routable(self) -> list[Endpoint]:
        return [ep for ep in self.endpoints.values() if ep.routable]

    def candidates(self, endpoints: list[Endpoint], prompt: Prompt | None) -> list[Candidate]:
        """Policy inputs: each engine's load and its match of the prompt at the engine's own block size."""
        now = time.monotonic()
        out = []
        for ep in endpoints:
            hashes = prompt.hashes(ep.cache.block_size) if prompt is not None else []
            out.append(Candidate(ep.url, ep.load(self.config.metrics_max_age, now),
                                 ep.cache.match(hashes), len(hashes), len(ep.cache)))
        return out
