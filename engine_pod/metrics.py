"""Prometheus metrics of one engine pod, named as vLLM names them (dashboards and autoscalers carry over)."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)


class EngineMetrics:
    """One registry per server, so several servers (tests) can live in one process."""

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.num_requests_running = Gauge("vllm:num_requests_running", "Requests in the running batch", labels, registry=r)
        self.num_requests_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled", labels, registry=r)
        self.kv_cache_usage_perc = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)", labels, registry=r)
        self.prefix_cache_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels, registry=r)
        self.prefix_cache_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", labels, registry=r)
        self.num_preemptions = Counter("vllm:num_preemptions", "Preemptions (recompute) so far", labels, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of admitted requests", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", labels, registry=r)
        self.request_success = Counter("vllm:request_success", "Finished requests by reason", labels + ["finished_reason"], registry=r)
        self.time_to_first_token = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("vllm:inter_token_latency_seconds", "Time between tokens", labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("vllm:e2e_request_latency_seconds", "Arrival to finish", labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.request_queue_time = Histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled", labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.model_name = model_name
        self._children: dict[tuple, object] = {}

    def labeled(self, name: str, **labels):
        """The metric `name`'s series for this model (and `labels`), looked up once: the server updates
        some of them for every token."""
        key = (name, *labels.values())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = getattr(self, name).labels(model_name=self.model_name, **labels)
        return child
