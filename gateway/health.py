"""Active health checks and load scraping, one loop per engine."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from nanoserve.gateway.config import GatewayConfig
from nanoserve.gateway.endpoints import Endpoint

log = logging.getLogger(__name__)


async def probe(session: aiohttp.ClientSession, ep: Endpoint, cfg: GatewayConfig) -> bool:
    """One health probe; True when the engine answers 200 (a 503 means loading or draining)."""
    try:
        timeout = aiohttp.ClientTimeout(total=cfg.health_timeout)
        async with session.get(ep.url + cfg.health_path, timeout=timeout, allow_redirects=False) as resp:
            await resp.read()
            return resp.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False


def parse_engine_metrics(text: str) -> dict[str, float]:
    """Sums of the vLLM-style gauges the router uses, by metric name."""
    wanted = {"vllm:num_requests_running", "vllm:num_requests_waiting"}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


async def scrape(session: aiohttp.ClientSession, ep: Endpoint, cfg: GatewayConfig) -> None:
    try:
        timeout = aiohttp.ClientTimeout(total=cfg.health_timeout)
        async with session.get(ep.url + "/metrics", timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                return
            values = parse_engine_metrics(await resp.text())
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        return  # stale metrics age out; health is the probe's business
    if "vllm:num_requests_running" in values or "vllm:num_requests_waiting" in values:
        ep.engine_busy = int(values.get("vllm:num_requests_running", 0) + values.get("vllm:num_requests_waiting", 0))
        ep.metrics_at = time.monotonic()


async def watch_engine(session: aiohttp.ClientSession, ep: Endpoint, cfg: GatewayConfig) -> None:
    """Probe forever (until cancelled); scrape /metrics every metrics_interval while healthy."""
    next_scrape = 0.0
    while True:
        was_healthy = ep.healthy
        if await probe(session, ep, cfg):
            ep.probe_ok(cfg.healthy_threshold)
        else:
            ep.probe_failed(cfg.unhealthy_threshold)
        if ep.healthy != was_healthy:
            log.info("engine %s is %s", ep.url, "up" if ep.healthy else "down")
        if ep.healthy and time.monotonic() >= next_scrape:
            await scrape(session, ep, cfg)
            next_scrape = time.monotonic() + cfg.metrics_interval
        await asyncio.sleep(cfg.health_interval)
