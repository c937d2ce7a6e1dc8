"""Engine load: /metrics parsing, freshness, and the balance thresholds end to end."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from nanoserve.gateway.cache_index import CacheIndex
from nanoserve.gateway.endpoints import Endpoint
from nanoserve.gateway.health import parse_engine_metrics

ENGINE_METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 4
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.25
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{model_name="m"} 100
"""


def test_engine_metrics_are_parsed():
    values = parse_engine_metrics(ENGINE_METRICS)
    assert values == {"vllm:num_requests_running": 3, "vllm:num_requests_waiting": 4}


def test_load_uses_engine_counts_only_while_fresh():
    ep = Endpoint("http://e", CacheIndex(), in_flight=2, engine_busy=7)
    now = time.monotonic()
    ep.metrics_at = now - 1.0
    assert ep.load(metrics_max_age=5.0, now=now) == 7  # other gateways' requests count too
    assert ep.load(metrics_max_age=0.5, now=now) == 2  # stale: only what this gateway knows
    ep.engine_busy = 1
    assert ep.load(metrics_max_age=5.0, now=now) == 2  # never below our own in-flight count


def test_probe_thresholds():
    ep = Endpoint("http://e", CacheIndex())
    ep.probe_ok(healthy_threshold=2)
    assert not ep.healthy
    ep.probe_ok(healthy_threshold=2)
    assert ep.healthy
    ep.cache.record([1, 2])
    ep.probe_failed(unhealthy_threshold=2)
    assert ep.healthy
    ep.probe_failed(unhealthy_threshold=2)
    assert not ep.healthy and len(ep.cache) == 0  # down: a restarted engine starts cold


def test_burst_on_one_prefix_spills_over_only_past_the_thresholds(fake_engines_shared, start_gateway, tiny_tokenizer):
    engines = fake_engines_shared(3, latency=0.3, tokens=1)
    prompt = " ".join(f"w{i}" for i in range(64))  # same long prompt for all: one engine holds it
    burst = 12

    async def run(**routing) -> tuple[set[str], str]:
        from nanoserve.gateway import RoutingConfig

        async with aiohttp.ClientSession() as s:
            for e in engines:
                await s.post(e.url + "/fake/state", json={"reset": True})
            async with start_gateway(
                [e.url for e in engines], model=tiny_tokenizer, routing=RoutingConfig(**routing)
            ) as gw:
                async with s.post(gw.url + "/v1/completions", json={"prompt": prompt}) as r:  # warm one engine
                    await r.read()

                async def one() -> str:
                    async with s.post(gw.url + "/v1/completions", json={"prompt": prompt}) as r:
                        assert r.status == 200
                        return r.headers["X-Nanoserve-Engine"]

                used = set(await asyncio.gather(*(one() for _ in range(burst))))
                return used, gw.metrics_text().decode()

    used, _ = asyncio.run(run(balance_abs_threshold=burst, balance_rel_threshold=1.5))
    assert len(used) == 1  # never overloaded: all on the engine holding the prefix
    used, metrics = asyncio.run(run(balance_abs_threshold=2, balance_rel_threshold=1.5))
    assert len(used) > 1
    assert 'nanoserve_gateway_routing_decisions_total{reason="load"}' in metrics
