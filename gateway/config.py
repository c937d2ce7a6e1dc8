"""Gateway configuration: routing thresholds in one dataclass, the rest (endpoints, health, retries) in another."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RoutingConfig:
    """Thresholds of the cache-aware policy (prior art: sgl-router's cache_threshold 0.3, balance 64 abs / 1.5 rel)."""
    # A cache match counts only if it covers at least this fraction of the prompt's full blocks.
    cache_threshold: float = 0.3
    # The best-matching engine is skipped when it is overloaded relative to the least-loaded one:
    # load > min_load + balance_abs_threshold AND load > min_load * balance_rel_threshold.
    balance_abs_threshold: int = 16
    balance_rel_threshold: float = 1.5


@dataclass
class GatewayConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    engines: list[str] = field(default_factory=list)  # static engine base URLs
    service: str | None = None        # Kubernetes Service whose EndpointSlices list the engines
    namespace: str = "default"
    port_name: str | None = None      # EndpointSlice port name (None: the first port)
    scheme: str = "http"
    model: str | None = None          # a local copy of the engines' tokenizer (None: each engine serves its own)
    served_model_name: str | None = None  # when set, requests for another model get 404
    engine_api_key: str | None = None  # the gateway's own engine calls (feed, /v1/models); see api_keys
    # Client auth of the gateway's own: when set, /v1/* (and /metrics unless public_metrics) need
    # "Authorization: Bearer <one of these>" (passed on to the engine like any client header).
    api_keys: list[str] = field(default_factory=list)
    public_metrics: bool = False
    max_body_bytes: int = 64 * 1024 * 1024  # client request bodies, after decompression (413 above)
    policy: str = "cache-aware"       # cache-aware | round-robin | least-loaded
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    block_size: int = 16              # until an engine's cache feed reports its own
    approx_capacity_blocks: int = 1 << 16  # per-engine LRU bound of the approximate index
    pending_ttl: float = 10.0         # precise mode: a routed prompt counts as cached until confirmed or this old
    # Active health checks.
    health_path: str = "/ready"
    health_interval: float = 2.0
    health_timeout: float = 2.0
    unhealthy_threshold: int = 2      # consecutive failed probes before an engine is marked down
    healthy_threshold: int = 1        # consecutive good probes before it is routed to again
    metrics_interval: float = 2.0     # engine /metrics scrape period (waiting queue)
    metrics_max_age: float = 5.0      # older scrapes are ignored
    feed_retry_interval: float = 1.0  # reconnect delay of the cache-event feed
    feed_idle_timeout: float = 120.0  # reconnect (and resync) a feed silent for this long
    tokenizer_retry_interval: float = 30.0  # an engine whose tokenizer could not be used is asked again after this
    # Proxying.
    max_attempts: int = 3             # tries per request, each on the next-best engine, before the first byte
    retry_backoff: float = 0.05       # seconds, doubled after each failed attempt
    connect_timeout: float = 5.0
    read_timeout: float = 600.0       # longest silence from an engine mid-response
    # Streaming requests: an engine sends its response headers at once, so one silent this long has hung;
    # it is marked down and the request goes to the next engine. (A non-streaming answer starts with its
    # last token: that wait is bounded by read_timeout only.)
    first_byte_timeout: float = 60.0
    # Circuit breaker (gateway/breaker.py): after this many consecutive failed requests (connection errors,
    # timeouts, invalid HTTP, 5xx) an engine gets no traffic for breaker_cooldown seconds, doubled after each
    # failed trial up to breaker_max_cooldown. 0 turns it off.
    breaker_threshold: int = 5
    breaker_cooldown: float = 2.0
    breaker_max_cooldown: float = 60.0
    drain_timeout: float = 30.0       # on shutdown, how long open requests may still run
