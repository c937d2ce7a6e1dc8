"""Scale from zero, and to zero when idle, through the InferenceService's scale subresource (`kubectl scale`'s
API): the gateway is the one place that sees a request arrive for a service with no engine.

From zero: a generation request that finds no routable engine is held (at most `max_held_requests`, for at
most `activation_timeout` seconds, then 503) while the scale is raised to 1 if it is 0; the operator rolls the
engine out, discovery and probes find it, and the held requests go to it. To zero: once every engine has had
no request running or waiting (their own /metrics) and none was held or open here for `scale_to_zero_after`
seconds, the scale goes to 0. A HorizontalPodAutoscaler leaves a target at 0 replicas alone (scaling
disabled), and takes over again from 1; with KEDA, its ScaledObject scales to zero instead (not rendered here).

The kubernetes client blocks: its calls run in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from nanoserve.gateway.config import GatewayConfig
from nanoserve.gateway.endpoints import EndpointPool
from nanoserve.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "serving.nanoserve.io", "v1alpha1", "inferenceservices"
POLL_SECONDS = 0.25  # how often a held request looks for an engine (a cold start takes tens of seconds)


class ScaleClient:
    """get/set spec.replicas of one InferenceService's scale subresource."""

    def __init__(self, name: str, namespace: str) -> None:
        from kubernetes import client, config  # lazy: only in a cluster

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self.api, self.name, self.namespace = client.CustomObjectsApi(), name, namespace

    def replicas(self) -> int:
        scale: dict = self.api.get_namespaced_custom_object_scale(  # type: ignore[assignment] - the client returns a dict
            GROUP, VERSION, self.namespace, PLURAL, self.name
        )
        return int((scale.get("spec") or {}).get("replicas") or 0)

    def scale(self, replicas: int) -> None:
        body = {"spec": {"replicas": replicas}}
        self.api.patch_namespaced_custom_object_scale(GROUP, VERSION, self.namespace, PLURAL, self.name, body)


class Activator:
    """`scale`: a ScaleClient, or anything with its replicas() and scale(n)."""

    def __init__(self, pool: EndpointPool, scale: Any, config: GatewayConfig, metrics: GatewayMetrics) -> None:
        self.pool, self.client, self.metrics = pool, scale, metrics
        self.activation_timeout, self.max_held = config.activation_timeout, config.max_held_requests
        self.idle_after, self.metrics_max_age = config.scale_to_zero_after, config.metrics_max_age
        self.held = 0
        self.last_busy = time.monotonic()
        self._waking: asyncio.Task | None = None

    def busy_now(self) -> bool:
        """Anything held or open here, or running/waiting on an engine (or an engine not heard from lately)."""
        if self.held:
            return True
        now = time.monotonic()
        for ep in self.pool.endpoints.values():
            if ep.in_flight or now - ep.metrics_at > self.metrics_max_age or ep.engine_busy:
                return True
        return False

    async def wait_for_engine(self) -> str | None:
        """Hold a request until an engine is routable, waking the service first. None when one is, else why not."""
        if self.held >= self.max_held:
            return f"{self.held} requests already wait for an engine to start"
        self.held += 1
        self.last_busy = time.monotonic()
        self.metrics.held_requests.set(self.held)
        try:
            if self._waking is None or self._waking.done():
                self._waking = asyncio.create_task(self._wake())
            async with asyncio.timeout(self.activation_timeout):
                while not self.pool.routable():
                    await asyncio.sleep(POLL_SECONDS)
            return None
        except TimeoutError:
            return f"no engine became ready within {self.activation_timeout:g} s"
        finally:
            self.held -= 1
            self.last_busy = time.monotonic()
            self.metrics.held_requests.set(self.held)

    async def _wake(self) -> None:
        try:
            if await asyncio.to_thread(self.client.replicas) == 0:
                await asyncio.to_thread(self.client.scale, 1)
                log.info("scaled from zero: no engine for a request")
                self.metrics.scale_events.labels("up").inc()
        except Exception as e:  # noqa: BLE001 - API errors: the held requests time out with a 503
            log.warning("could not scale from zero: %r", e)

    async def run_idle_scaler(self) -> None:
        """Scale to zero after `idle_after` quiet seconds (until cancelled)."""
        while True:
            await asyncio.sleep(min(5.0, self.idle_after / 4))
            if self.busy_now():
                self.last_busy = time.monotonic()
                continue
            if not self.pool.endpoints or time.monotonic() - self.last_busy < self.idle_after:
                continue
            try:
                if await asyncio.to_thread(self.client.replicas) > 0 and not self.busy_now():
                    await asyncio.to_thread(self.client.scale, 0)
                    log.info("scaled to zero: idle for %g s", self.idle_after)
                    self.metrics.scale_events.labels("down").inc()
            except Exception as e:  # noqa: BLE001 - API errors: try again at the next tick
                log.warning("could not scale to zero: %r", e)
            self.last_busy = time.monotonic()
