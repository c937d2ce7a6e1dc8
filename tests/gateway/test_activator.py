"""Scale from zero and to zero (gateway/activator.py) over a real endpoint pool, with the scale subresource
as an in-memory object (the whole path against an API server: tests/operator/test_scale_from_zero.py)."""

from __future__ import annotations

import asyncio
import threading
import time

from poll import until_async

from nanoserve.gateway.activator import Activator
from nanoserve.gateway.config import GatewayConfig
from nanoserve.gateway.endpoints import EndpointPool
from nanoserve.gateway.metrics import GatewayMetrics


class Scale:
    """spec.replicas as the API server holds it; the kubernetes client's calls arrive from a thread."""

    def __init__(self, replicas: int) -> None:
        self.value, self.calls, self.lock = replicas, [], threading.Lock()

    def replicas(self) -> int:
        with self.lock:
            return self.value

    def scale(self, replicas: int) -> None:
        with self.lock:
            self.value = replicas
            self.calls.append(replicas)


URL = "http://10.0.0.1:8000"


def activator(scale: Scale, **kw) -> tuple[Activator, EndpointPool]:
    config = GatewayConfig(**(dict(activation_timeout=30.0, max_held_requests=8, metrics_max_age=5.0) | kw))
    pool = EndpointPool(config)
    return Activator(pool, scale, config, GatewayMetrics()), pool


def engine_up(pool: EndpointPool, busy: int = 0) -> None:
    """Discovery lists the engine, its probe passes and its /metrics was just scraped."""
    pool.set_targets({URL: True})
    ep = pool.endpoints[URL]
    ep.healthy, ep.engine_busy, ep.metrics_at = True, busy, time.monotonic()


def test_a_request_with_no_engine_wakes_the_service_and_waits_for_its_engine():
    async def main():
        scale = Scale(0)
        act, pool = activator(scale)
        held = [asyncio.create_task(act.wait_for_engine()) for _ in range(3)]
        await until_async(lambda: scale.calls == [1], "the scale raised from 0 to 1")
        assert act.held == 3 and not any(t.done() for t in held)
        sample = act.metrics.registry.get_sample_value
        assert sample("nanoserve_gateway_held_requests") == 3
        engine_up(pool)
        assert await asyncio.gather(*held) == [None, None, None]
        assert act.held == 0 and scale.calls == [1]  # woken once, for all of them
        assert sample("nanoserve_gateway_held_requests") == 0
        assert sample("nanoserve_gateway_scale_events_total", {"direction": "up"}) == 1

    asyncio.run(main())


def test_a_service_already_scaling_up_is_not_patched_and_waits_are_bounded():
    async def main():
        scale = Scale(2)  # replicas set, engines not ready yet (e.g. a rollout): only wait
        act, _ = activator(scale, activation_timeout=0.3, max_held_requests=2)
        first = [asyncio.create_task(act.wait_for_engine()) for _ in range(2)]
        await until_async(lambda: act.held == 2, "two requests held")
        assert await act.wait_for_engine() == "2 requests already wait for an engine to start"
        assert await asyncio.gather(*first) == ["no engine became ready within 0.3 s"] * 2
        assert scale.calls == [] and act.held == 0

    asyncio.run(main())


def test_an_idle_service_goes_to_zero_and_a_busy_one_does_not():
    async def main():
        scale = Scale(1)
        act, pool = activator(scale, scale_to_zero_after=0.4)
        engine_up(pool, busy=1)  # a request running on the engine (sent through another gateway)
        scaler = asyncio.create_task(act.run_idle_scaler())
        try:
            t0 = time.monotonic()  # until the scaler has looked and found it busy twice the idle time later
            await until_async(lambda: act.last_busy > t0 + 0.8, "the scaler's checks past the idle time")
            assert scale.calls == []
            engine_up(pool, busy=0)
            await until_async(lambda: scale.calls == [0], "scaled to zero once idle")
        finally:
            scaler.cancel()

    asyncio.run(main())
