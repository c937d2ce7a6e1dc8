"""The prefix-cache-aware gateway: aiohttp reverse proxy, endpoint discovery, health checks, routing policies.

Torch-free on purpose: its image carries a tokenizer, not a model.
"""
from nanoserve.gateway.app import Gateway, build_app, run_gateway, serve
from nanoserve.gateway.config import GatewayConfig, RoutingConfig

__all__ = ["Gateway", "GatewayConfig", "RoutingConfig", "build_app", "run_gateway", "serve"]
