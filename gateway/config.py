"""Gateway configuration: routing thresholds in one dataclass, the rest (endpoints, health, retries) in another.
Each field is also a `nanoserve gateway` flag, with its help (common/flags.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanoserve.common.flags import setting, settings_argv

POLICIES = ("cache-aware", "round-robin", "least-loaded")  # gateway/policy.py's make_policy


@dataclass
class RoutingConfig:
    """Thresholds of the cache-aware policy (prior art: sgl-router's cache_threshold 0.3, balance 64 abs / 1.5 rel).
    The best-matching engine is skipped when it is overloaded relative to the least-loaded one:
    load > min_load + balance_abs_threshold AND load > min_load * balance_rel_threshold."""

    cache_threshold: float = setting(
        0.3, "least fraction of the prompt's full blocks a cache match must cover to count"
    )
    balance_abs_threshold: int = setting(
        16,
        "the best match is skipped when its load is more than this above the "
        "least load (and more than balance-rel-threshold times it)",
    )
    balance_rel_threshold: float = setting(
        1.5,
        "the best match is skipped when its load is more than this many "
        "times the least load (and more than balance-abs-threshold above)",
    )


@dataclass
class GatewayConfig:
    host: str = setting("0.0.0.0", "the address to listen on")
    port: int = setting(8080, "the port to listen on")
    engines: list[str] = setting(
        help="an engine's base URL, e.g. http://127.0.0.1:8000 (repeatable)",
        flags=("--engine",),
        metavar="URL",
        factory=list,
    )
    service: str | None = setting(
        None, "the Kubernetes Service whose EndpointSlices list the engines", unset="none, only --engine"
    )
    namespace: str = setting("default", "the Service's namespace")
    port_name: str | None = setting(None, "the EndpointSlice port's name", unset="the first port")
    scheme: str = setting("http", "the URL scheme of the Service's engines", choices=("http", "https"))
    model: str | None = setting(
        None,
        "a local copy of the engines' tokenizer, checked against each engine's fingerprint",
        unset="none: each engine serves its own at /v1/tokenizer",
    )
    served_model_name: str | None = setting(
        None,
        "the model's name in the API: requests for another get 404",
        unset="any name passes; `nanoserve up`: its --model as given",
    )
    engine_api_key: str | None = setting(
        None, "the engines' API key, for the gateway's own calls: feeds, probes, /v1/models", unset="$NANOSERVE_API_KEY"
    )
    # Client auth of the gateway's own: passed on to the engine like any client header.
    api_keys: list[str] = setting(
        help="a client key of the gateway's own (repeatable; also "
        "$NANOSERVE_GATEWAY_API_KEYS, comma-separated, and --api-key-file): /v1/* "
        "and /metrics then need 'Authorization: Bearer KEY'",
        flags=("--api-key",),
        metavar="KEY",
        factory=list,
    )
    cache_salt_by_api_key: bool = setting(
        False,
        "the engines run with --cache-salt-by-api-key: hash each prompt under its client's key as they do, "
        "so that routing finds each tenant's blocks",
    )
    public_metrics: bool = setting(False, "serve /metrics without a key (with --api-key)")
    max_body_bytes: int = setting(64 * 1024 * 1024, "largest client request body, after decompression (413 above)")
    policy: str = setting("cache-aware", "how an engine is picked", choices=POLICIES)
    routing: RoutingConfig = field(default_factory=RoutingConfig)  # its fields are flags too
    block_size: int = setting(16, "tokens per KV-cache block, until an engine's cache feed reports its own")
    approx_capacity_blocks: int = setting(
        1 << 16, "per-engine bound (LRU) of each approximate index: routed block hashes (no feed), text chunks"
    )
    pending_ttl: float = setting(
        10.0, "seconds a routed prompt counts as cached on its engine until the engine's feed confirms it"
    )
    # Active health checks.
    health_path: str = setting("/ready", "the engines' readiness path, probed")
    health_interval: float = setting(2.0, "seconds between an engine's probes")
    health_timeout: float = setting(2.0, "seconds a probe may take")
    unhealthy_threshold: int = setting(2, "consecutive failed probes before an engine is marked down")
    healthy_threshold: int = setting(1, "consecutive good probes before it is routed to again")
    metrics_interval: float = setting(2.0, "seconds between scrapes of an engine's /metrics (running + waiting)")
    metrics_max_age: float = setting(5.0, "seconds after which a scrape no longer counts")
    feed_retry_interval: float = setting(1.0, "seconds before the cache-event feed reconnects")
    feed_idle_timeout: float = setting(120.0, "seconds of silence after which a feed reconnects (and resyncs)")
    tokenizer_retry_interval: float = setting(
        30.0, "seconds before an engine whose tokenizer could not be used is asked again"
    )
    # Proxying.
    max_attempts: int = setting(3, "tries per request, each on the next-best engine, before the first byte")
    retry_backoff: float = setting(0.05, "seconds before a retry, doubled after each failed attempt")
    connect_timeout: float = setting(5.0, "seconds to connect to an engine")
    read_timeout: float = setting(
        600.0,
        "longest silence from an engine mid-response (and the longest wait for a "
        "non-streaming answer, which starts with its last token)",
    )
    # An engine sends a stream's headers at once, so one silent this long has hung.
    first_byte_timeout: float = setting(
        60.0,
        "streaming requests: longest wait for an engine's response headers "
        "before it counts as hung (marked down, the request retried "
        "elsewhere)",
    )
    # Circuit breaker (gateway/breaker.py).
    breaker_threshold: int = setting(
        5,
        "consecutive failed requests (connection errors, timeouts, invalid HTTP, "
        "5xx, redirects) that open an engine's circuit breaker (0: never)",
    )
    breaker_cooldown: float = setting(2.0, "seconds an open breaker keeps traffic away, doubled per failed trial")
    breaker_max_cooldown: float = setting(60.0, "most seconds of a breaker's cooldown")
    drain_timeout: float = setting(30.0, "on SIGTERM, seconds open requests may still run")
    # Scale from zero (gateway/activator.py).
    scale_target: str | None = setting(
        None,
        "the InferenceService (in --namespace) whose scale subresource the gateway raises from 0 to 1 when a "
        "request finds no engine, holding the request meanwhile",
        unset="none: no engine, 503 at once",
    )
    activation_timeout: float = setting(300.0, "with --scale-target: seconds a held request waits for an engine")
    max_held_requests: int = setting(256, "with --scale-target: requests held at once; 503 beyond")
    scale_to_zero_after: float = setting(
        0.0, "with --scale-target: seconds without any request after which the scale goes to 0 (0: never)"
    )
    workers: int = setting(
        1,
        "gateway processes sharing the port (SO_REUSEPORT), each a whole gateway: more cores for bursts of "
        "streams; /metrics adds them up (gateway/workers.py)",
    )


def gateway_argv(settings: dict) -> list[str]:
    """GatewayConfig settings (field name -> value) as `nanoserve gateway` flags (the operator's gateway pods)."""
    return settings_argv(GatewayConfig, settings)
