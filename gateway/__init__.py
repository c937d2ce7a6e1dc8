"""The prefix-cache-aware gateway: aiohttp reverse proxy, endpoint discovery, health checks, routing policies.

Torch-free on purpose: its image carries a tokenizer, not a model. The app is imported when first asked
for, so that the command lines and the operator, which need the config only, do not load it.
"""

from typing import TYPE_CHECKING

from nanoserve.gateway.config import GatewayConfig, RoutingConfig

if TYPE_CHECKING:
    from nanoserve.gateway.app import Gateway, build_app, run_gateway, serve

__all__ = ["Gateway", "GatewayConfig", "RoutingConfig", "build_app", "run_gateway", "serve"]


def __getattr__(name: str):
    if name in ("Gateway", "build_app", "run_gateway", "serve"):
        from nanoserve.gateway import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
