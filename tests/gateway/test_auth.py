"""The gateway's own client keys: checked before any routing; probes stay open; /metrics is private."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from nanoserve.common.block_hash import block_hashes, salt_root, tenant_salt
from nanoserve.gateway.middleware import bearer_ok

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "w1 w2 w3"}]}


async def status_of(session, method, url, key=None, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.request(method, url, headers=headers, **kw) as resp:
        return resp.status, resp.headers, await resp.read()


def test_bearer_check():
    assert bearer_ok("Bearer k2", ["k1", "k2"]) and bearer_ok("bearer k1", ["k1"])
    for header in ("", "Bearer", "Bearer ", "Basic k1", "Bearer k1x", "k1", "Bearer k"):
        assert not bearer_ok(header, ["k1"]), header
    assert not bearer_ok("Bearer k1", [])


def test_keys_are_required_before_routing(local_engines, start_gateway):
    async def main():
        async with (
            local_engines({}) as [url],
            start_gateway([url], api_keys=["k1", "k2"]) as gw,
            aiohttp.ClientSession() as s,
        ):
            chat = gw.url + "/v1/chat/completions"
            for key in (None, "wrong", "k1 k2"):
                status, headers, body = await status_of(s, "POST", chat, key, json=CHAT)
                assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
                assert json.loads(body)["error"]["code"] == "invalid_api_key"
            assert (await status_of(s, "GET", gw.url + "/v1/models"))[0] == 401
            # Nothing was routed, recorded or sent on.
            metrics = gw.metrics_text().decode()
            assert "nanoserve_gateway_routing_decisions_total{" not in metrics
            assert len(gw.pool.endpoints[url].text_cache) == 0
            async with s.get(url + "/fake/state") as resp:
                assert (await resp.json())["requests"] == 0
            for key in ("k1", "k2"):
                assert (await status_of(s, "POST", chat, key, json=CHAT))[0] == 200
            assert (await status_of(s, "GET", gw.url + "/v1/models", "k2"))[0] == 200
            # Probes need no key; metrics do.
            assert (await status_of(s, "GET", gw.url + "/health"))[0] == 200
            assert (await status_of(s, "GET", gw.url + "/ready"))[0] == 200
            assert (await status_of(s, "GET", gw.url + "/metrics"))[0] == 401
            assert (await status_of(s, "GET", gw.url + "/metrics", "k1"))[0] == 200

    asyncio.run(main())


def test_public_metrics_and_the_client_key_reaching_the_engine(local_engines, start_gateway):
    async def main():
        async with (
            local_engines({"api_key": "k1"}) as [url],
            start_gateway([url], api_keys=["k1"], engine_api_key="k1", public_metrics=True) as gw,
            aiohttp.ClientSession() as s,
        ):
            assert (await status_of(s, "GET", gw.url + "/metrics"))[0] == 200
            assert (await status_of(s, "POST", gw.url + "/v1/chat/completions", "k1", json=CHAT))[0] == 200

    asyncio.run(main())


def test_routing_hashes_a_prompt_under_its_client_key_when_the_engines_salt_by_key(local_engines, start_gateway):
    """Engines under --cache-salt-by-api-key chain a tenant's blocks to its key's salt: the gateway, told so,
    records the prompt under the same hashes, and under no other (what it records is what it matches)."""
    ids = list(range(3, 67))  # 64 token ids: whole blocks at any block size the index uses

    async def main():
        async with (
            local_engines({}) as [url],
            start_gateway([url], cache_salt_by_api_key=True) as gw,
            aiohttp.ClientSession() as s,
        ):
            body = {"prompt": ids, "max_tokens": 1}
            assert (await status_of(s, "POST", gw.url + "/v1/completions", "k1", json=body))[0] == 200
            cache = gw.pool.endpoints[url].cache
            salted = block_hashes(ids, cache.block_size, salt_root(tenant_salt("k1")))
            assert cache.match(salted) == len(salted) > 0
            assert cache.match(block_hashes(ids, cache.block_size)) == 0

    asyncio.run(main())
