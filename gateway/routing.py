"""One request's routing decision: the body's checks, its prompt, the policy's ranking of the engines.

Shared by the HTTP proxy (gateway/proxy.py), which then forwards the request itself, and the endpoint picker
(gateway/ext_proc.py), which hands the ranking to Envoy: both route exactly alike.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nanoserve.gateway.endpoints import Endpoint, routing_mode
from nanoserve.gateway.policy import Decision
from nanoserve.gateway.prompt import Prompt, build_prompt

if TYPE_CHECKING:
    from nanoserve.gateway.app import Gateway

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """An OpenAI-shaped error the request gets instead of an engine."""

    status: int
    message: str
    type: str
    code: str | None = None


@dataclass(frozen=True)
class Routing:
    decision: Decision  # ranked engine URLs: the chosen one first, then the retry order
    mode: str  # how the prompt was matched (endpoints.routing_mode)
    prompt: Prompt | None
    body: dict


NO_ENGINE = Refusal(503, "no healthy engine", "server_error", "no_healthy_engine")


def parse_body(raw: bytes) -> dict | None:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, a 5,000-digit number, deep nesting
        return None
    return body if isinstance(body, dict) else None


def bearer_key(authorization: str) -> str | None:
    """The key of `Authorization: Bearer <key>`, which engines salt a client's blocks by."""
    scheme, _, key = authorization.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def rank(gw: Gateway, endpoints: list[Endpoint], prompt: Prompt | None) -> tuple[Decision, str]:
    mode = routing_mode(endpoints, prompt)
    decision = gw.policy.rank(gw.pool.candidates(endpoints, prompt, mode))
    gw.metrics.decisions.labels(decision.reason).inc()
    gw.metrics.prompt_modes.labels(mode).inc()
    gw.metrics.matched_blocks.observe(decision.matched)
    return decision, mode


async def routable_or_wake(gw: Gateway) -> list[Endpoint] | Refusal:
    """The routable engines; with none and scale from zero on, once the engine it starts is (or why not)."""
    endpoints = gw.pool.routable()
    if not endpoints and gw.activator is not None:
        if (why := await gw.activator.wait_for_engine()) is not None:
            return Refusal(503, f"no healthy engine: {why}", "server_error", "no_healthy_engine")
        endpoints = gw.pool.routable()
    return endpoints


def route_by_load(gw: Gateway, endpoints: list[Endpoint] | None = None) -> Routing | Refusal:
    """A request without a prompt to match (a GET, a path that is not a generation)."""
    endpoints = gw.pool.routable() if endpoints is None else endpoints
    if not endpoints:
        return NO_ENGINE
    decision, mode = rank(gw, endpoints, None)
    return Routing(decision, mode, None, {})


async def decide(
    gw: Gateway, path: str, raw: bytes, authorization: str = "", endpoints: list[Endpoint] | None = None
) -> Routing | Refusal:
    """POST /v1/completions or /v1/chat/completions: where its body goes, among `endpoints` (default: every
    routable engine), or why it goes nowhere."""
    body = parse_body(raw)
    if body is None:
        return Refusal(400, "request body must be a JSON object", "invalid_request_error")
    served = gw.config.served_model_name
    if served and body.get("model") not in (None, served):
        return Refusal(404, f"model {body.get('model')!r} does not exist", "invalid_request_error", "model_not_found")
    if endpoints is None:
        woken = await routable_or_wake(gw)
        if isinstance(woken, Refusal):
            return woken
        endpoints = woken
    if not endpoints:
        return NO_ENGINE
    prompt = None
    try:
        if gw.policy.uses_cache:
            tokenizers = list({ep.tokenizer.fingerprint: ep.tokenizer for ep in endpoints if ep.tokenizer}.values())
            salt_key = bearer_key(authorization) if gw.config.cache_salt_by_api_key else None
            build = functools.partial(build_prompt, path, body, tokenizers, salt_key)
            # Long prompts are tokenized off the event loop (the Rust tokenizer releases the GIL).
            prompt = await asyncio.to_thread(build) if len(raw) > 16384 else build()
        decision, mode = rank(gw, endpoints, prompt)
    except Exception as e:  # noqa: BLE001 - a body the prompt code did not foresee: route by load, the engine judges
        # Not a warning with a traceback: any client can send these, and the log must not be theirs to flood.
        log.debug("routing by load: the prompt could not be matched (%r)", e)
        prompt = None
        decision, mode = rank(gw, endpoints, None)
    return Routing(decision, mode, prompt, body)
