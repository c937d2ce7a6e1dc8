"""Prometheus metrics of one engine pod, named as vLLM names them (dashboards and autoscalers carry over)."""

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Bucket sets per kind of value, as vLLM's differ: a token's latency, a request's phases, token counts.
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
_TOKEN_TIME_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)
_REQUEST_TIME_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


def token_buckets(max_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_len (vLLM's 1-2-5 series for token counts)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_len:
                return out
            out.append(m * scale)
        scale *= 10


class EngineMetrics:
    """One registry per server, so several servers (tests) can live in one process."""

    def __init__(
        self,
        model_name: str,
        max_model_len: int = 4096,
        block_size: int = 16,
        num_blocks: int = 0,
        prefix_caching: bool = True,
        cache_dtype: str = "auto",
    ):
        self.registry = r = CollectorRegistry()
        labels = ["model_name", "engine"]  # vLLM V1's: the engine core's index (one here: "0")
        tokens = token_buckets(max_model_len)
        self.num_requests_running = Gauge(
            "vllm:num_requests_running", "Requests in the running batch", labels, registry=r
        )
        self.num_requests_waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting to be scheduled", labels, registry=r
        )
        self.kv_cache_usage_perc = Gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)", labels, registry=r
        )
        # vLLM V0's names, which routers still read (production-stack's among them)
        self.gpu_cache_usage_perc = Gauge(
            "vllm:gpu_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1; V0's name)", labels, registry=r
        )
        self.gpu_prefix_cache_hit_rate = Gauge(
            "vllm:gpu_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / looked up, so far (V0's name)",
            labels,
            registry=r,
        )
        self.prefix_cache_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels, registry=r
        )
        self.prefix_cache_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", labels, registry=r
        )
        self.num_preemptions = Counter("vllm:num_preemptions", "Preemptions (recompute) so far", labels, registry=r)
        self.spec_decode_num_drafts = Counter(
            "vllm:spec_decode_num_drafts", "Speculative drafts verified (one per sequence and step)", labels, registry=r
        )
        self.spec_decode_num_draft_tokens = Counter(
            "vllm:spec_decode_num_draft_tokens", "Draft tokens verified", labels, registry=r
        )
        self.spec_decode_num_accepted_tokens = Counter(
            "vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted", labels, registry=r
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of admitted requests", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", labels, registry=r)
        self.request_success = Counter(
            "vllm:request_success", "Finished requests by reason", labels + ["finished_reason"], registry=r
        )
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inter_token_latency = Histogram(
            "vllm:inter_token_latency_seconds", "Time between tokens", labels, buckets=_TOKEN_TIME_BUCKETS, registry=r
        )
        self.e2e_request_latency = Histogram(
            "vllm:e2e_request_latency_seconds", "Arrival to finish", labels, buckets=_REQUEST_TIME_BUCKETS, registry=r
        )
        self.request_queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Arrival to first scheduled",
            labels,
            buckets=_REQUEST_TIME_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "vllm:time_per_output_token_seconds",
            "Time between tokens (vLLM's older name of inter_token_latency)",
            labels,
            buckets=_TOKEN_TIME_BUCKETS,
            registry=r,
        )
        self.request_time_per_output_token = Histogram(
            "vllm:request_time_per_output_token_seconds",
            "A request's mean time per output token after the first",
            labels,
            buckets=_TOKEN_TIME_BUCKETS,
            registry=r,
        )
        self.request_prefill_time = Histogram(
            "vllm:request_prefill_time_seconds",
            "First scheduled to first token",
            labels,
            buckets=_REQUEST_TIME_BUCKETS,
            registry=r,
        )
        self.request_decode_time = Histogram(
            "vllm:request_decode_time_seconds",
            "First token to finish",
            labels,
            buckets=_REQUEST_TIME_BUCKETS,
            registry=r,
        )
        self.request_inference_time = Histogram(
            "vllm:request_inference_time_seconds",
            "First scheduled to finish",
            labels,
            buckets=_REQUEST_TIME_BUCKETS,
            registry=r,
        )
        self.request_prompt_tokens = Histogram(
            "vllm:request_prompt_tokens", "Prompt tokens of a finished request", labels, buckets=tokens, registry=r
        )
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens",
            "Generated tokens of a finished request",
            labels,
            buckets=tokens,
            registry=r,
        )
        self.iteration_tokens = Histogram(
            "vllm:iteration_tokens_total", "Tokens computed in one engine step", labels, buckets=tokens, registry=r
        )
        self.cache_config_info = Gauge(
            "vllm:cache_config_info",
            "The KV cache's configuration (labels; value 1)",
            labels + ["block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching"],
            registry=r,
        )
        self.model_name = model_name
        self._children: dict[tuple, Any] = {}  # prometheus_client's labelled children
        self.labeled(
            "cache_config_info",
            block_size=str(block_size),
            num_gpu_blocks=str(num_blocks),
            cache_dtype=cache_dtype,
            enable_prefix_caching=str(prefix_caching),
        ).set(1)
        # Present from the start, as vLLM's: an endpoint picker (GAIE's) scrapes a fresh engine before its first step.
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "gpu_cache_usage_perc"):
            self.labeled(name).set(0)

    def labeled(self, name: str, **labels) -> Any:
        """The metric `name`'s series for this model (and `labels`), looked up once: the server updates
        some of them for every token."""
        key = (name, *labels.values())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = getattr(self, name).labels(model_name=self.model_name, engine="0", **labels)
        return child

    def finished(
        self,
        reason: str,
        arrival: float,
        scheduled_at: float | None,
        first_token_at: float | None,
        now: float,
        num_prompt_tokens: int,
        num_generated: int,
    ) -> None:
        """A finished request's own metrics: its size and the time of each of its phases."""
        m = self.labeled
        m("request_success", finished_reason=reason).inc()
        m("e2e_request_latency").observe(now - arrival)
        m("request_prompt_tokens").observe(num_prompt_tokens)
        m("request_generation_tokens").observe(num_generated)
        scheduled = arrival if scheduled_at is None else scheduled_at
        m("request_inference_time").observe(now - scheduled)
        if first_token_at is not None:
            m("request_prefill_time").observe(first_token_at - scheduled)
            m("request_decode_time").observe(now - first_token_at)
            if num_generated > 1:
                m("request_time_per_output_token").observe((now - first_token_at) / (num_generated - 1))
