"""The gateway's own Prometheus metrics, in a registry per gateway (several can run in one process).

Under `--workers N` (gateway/workers.py) each worker process writes its values to prometheus_client's
multiprocess files and /metrics renders all of them: counters and histograms add up, a gauge says how
(`multiprocess_mode`, ignored in a single process).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from nanoserve.gateway.endpoints import EndpointPool


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "nanoserve_gateway_requests", "Requests answered, by engine and status", ["engine", "status"], registry=r
        )
        self.decisions = Counter(
            "nanoserve_gateway_routing_decisions", "Routing decisions, by reason", ["reason"], registry=r
        )
        self.matched_blocks = Histogram(
            "nanoserve_gateway_matched_blocks",
            "Leading prompt blocks cached on the chosen engine",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.retries = Counter(
            "nanoserve_gateway_retries", "Attempts retried on another engine, by cause", ["cause"], registry=r
        )
        self.stream_errors = Counter(
            "nanoserve_gateway_stream_errors", "Responses cut off after the first byte", registry=r
        )
        self.ttfb = Histogram(
            "nanoserve_gateway_upstream_ttfb_seconds", "Engine time to first response byte", ["engine"], registry=r
        )
        self.latency = Histogram(
            "nanoserve_gateway_upstream_latency_seconds",
            "Engine time to the end of the response",
            ["engine"],
            registry=r,
        )
        self.prompt_modes = Counter(
            "nanoserve_gateway_prompt_match_mode",
            "Requests by how their prompt was matched: tokens (the engines' block hashes), "
            "text (text-prefix affinity, no verified tokenizer), none",
            ["mode"],
            registry=r,
        )
        self.tokenizer_errors = Counter(
            "nanoserve_gateway_tokenizer_errors",
            "Engine tokenizers refused, by reason (unavailable, invalid, mismatch)",
            ["reason"],
            registry=r,
        )
        self.routing_mode = Gauge(
            "nanoserve_gateway_routing_mode",
            "1 for the mode the gateway routes in now: tokens, text or load",
            ["mode"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.engine_tokenizer = Gauge(
            "nanoserve_gateway_engine_tokenizer_verified",
            "1 when the engine's tokenizer is verified (its fingerprint as a label)",
            ["engine", "fingerprint"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.up = Gauge(
            "nanoserve_gateway_engine_up",
            "1 when the engine is routed to",
            ["engine"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.in_flight = Gauge(
            "nanoserve_gateway_engine_in_flight",
            "Requests open on the engine",
            ["engine"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.held_requests = Gauge(
            "nanoserve_gateway_held_requests",
            "Requests held for an engine to start (scale from zero)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.scale_events = Counter(
            "nanoserve_gateway_scale_events",
            "Scale subresource changes the gateway made: up (from zero), down (to zero when idle)",
            ["direction"],
            registry=r,
        )
        self.cached_blocks = Gauge(
            "nanoserve_gateway_engine_cached_blocks",
            "Blocks in the gateway's index of the engine's cache",
            ["engine"],
            registry=r,
            multiprocess_mode="livemax",
        )

    @property
    def multiprocess_dir(self) -> str | None:
        return os.environ.get("PROMETHEUS_MULTIPROC_DIR")

    def refresh(self, pool: EndpointPool, mode: str) -> None:
        """Set the per-engine gauges and the routing mode from this gateway's view. Workers also do so every
        second (Gateway.start), since /metrics may be answered by another."""
        multiprocess_dir = self.multiprocess_dir
        gauges = (self.up, self.in_flight, self.cached_blocks, self.engine_tokenizer)
        for gauge in gauges:
            if multiprocess_dir:  # a series in the shared files cannot be deleted: a removed engine's reads 0
                for labels in list(gauge._metrics):  # (prometheus_client has no public list of a metric's labels)
                    gauge.labels(*labels).set(0)
            else:
                gauge.clear()  # forget removed engines
        for m in ("tokens", "text", "load"):
            self.routing_mode.labels(m).set(1 if m == mode else 0)
        for ep in pool.endpoints.values():
            fp = ep.tokenizer.fingerprint[:16] if ep.tokenizer else ""
            self.engine_tokenizer.labels(ep.url, fp).set(1 if ep.tokenizer else 0)
            self.up.labels(ep.url).set(1 if ep.routable else 0)
            self.in_flight.labels(ep.url).set(ep.in_flight)
            self.cached_blocks.labels(ep.url).set(len(ep.cache))

    def render(self, pool: EndpointPool, mode: str) -> bytes:
        """Exposition text, with per-engine gauges and the routing mode refreshed (of every worker)."""
        self.refresh(pool, mode)
        if not self.multiprocess_dir:
            return generate_latest(self.registry)
        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_worker, self.multiprocess_dir)
        return generate_latest(every_worker)
