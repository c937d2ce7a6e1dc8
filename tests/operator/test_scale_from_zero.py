"""Scale from zero and back, on the user's path: `kubectl apply` an InferenceService at zero replicas with
scaleToZero; a request to the gateway the operator renders (its container run as a process against the
emulated API server) is held while the gateway raises the scale subresource; the operator rolls the engine
Deployment to one replica; an engine starts (a fake one: the rendered engine is tested elsewhere) and its
EndpointSlice is published; the held request is answered. Idle, the gateway sets the scale back to zero and
the operator follows.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
from op_harness import NAMESPACE
from pods import Pod
from poll import until
from procs import reserve_port, wait_http

NAME = "wakes"
FAKE_ENGINE = Path(__file__).parents[1] / "gateway" / "fake_engine.py"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "w1 w2"}], "stream": True}


def replicas(kubectl, kind: str, name: str) -> int | None:
    obj = kubectl.get(kind, name)
    return None if obj is None else obj["spec"].get("replicas")


def engine_slice(ip: str, port: int) -> dict:
    """What the endpoints controller publishes for the ready engine pod."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{NAME}-engine-1", "labels": {"kubernetes.io/service-name": f"{NAME}-engine"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True, "serving": True}}],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }


async def stream(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.post(url + "/v1/chat/completions", json=CHAT) as resp:
        return resp.status, await resp.read()


def test_a_request_wakes_a_service_at_zero_and_an_idle_one_goes_back(kubectl, operator, cluster, tmp_path):
    kubectl.apply(
        {
            "apiVersion": "serving.nanoserve.io/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": NAME},
            "spec": {"device": "cpu", "replicas": 0, "scaleToZero": {"enabled": True, "idleSeconds": 2}},
        }
    )
    dep = until(lambda: kubectl.get("deployment", f"{NAME}-gateway"), "the gateway Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--scale-target") + 1] == NAME and "--scale-to-zero-after" in args
    role = kubectl.get("role", f"{NAME}-gateway")
    assert {"apiGroups": ["serving.nanoserve.io"], "resources": ["inferenceservices/scale"],
            "resourceNames": [NAME], "verbs": ["get", "patch"]} in role["rules"]  # fmt: skip
    gateway = Pod(dep, "127.0.40.2", tmp_path / "gateway", env={"KUBECONFIG": cluster.env["KUBECONFIG"]}).start()
    engine = None
    try:
        gateway.wait_ready()  # ready with no engine: it takes the requests that wake one

        async def main():
            nonlocal engine
            async with aiohttp.ClientSession() as s:
                held = asyncio.create_task(stream(s, gateway.url))
                await asyncio.to_thread(until, lambda: replicas(kubectl, "isvc", NAME) == 1, "the gateway's scale-up")
                await asyncio.to_thread(
                    until, lambda: replicas(kubectl, "deployment", f"{NAME}-engine") == 1, "the engine rolled out"
                )
                assert not held.done()  # held, not refused
                port = reserve_port("127.0.40.10")
                engine = subprocess.Popen(
                    [sys.executable, str(FAKE_ENGINE), "--host", "127.0.40.10", "--port", str(port)],
                    env={"PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"},
                )
                await asyncio.to_thread(wait_http, f"http://127.0.40.10:{port}/health", 60, engine)
                kubectl.apply(engine_slice("127.0.40.10", port))
                status, body = await held
                assert status == 200 and body.endswith(b"data: [DONE]\n\n"), body[-300:]
                # Quiet now: after idleSeconds the gateway scales to zero, and the operator follows.
                await asyncio.to_thread(until, lambda: replicas(kubectl, "isvc", NAME) == 0, "the scale-down")
                await asyncio.to_thread(
                    until, lambda: replicas(kubectl, "deployment", f"{NAME}-engine") == 0, "the engines gone"
                )
                text = await (await s.get(gateway.url + "/metrics")).text()
                events = [line for line in text.splitlines() if line.startswith("nanoserve_gateway_scale_events_total")]
                assert sorted(events) == [
                    'nanoserve_gateway_scale_events_total{direction="down"} 1.0',
                    'nanoserve_gateway_scale_events_total{direction="up"} 1.0',
                ], json.dumps(events)

        asyncio.run(main())
    finally:
        gateway.kill()
        if engine is not None:
            engine.kill()
        kubectl("delete", "-n", NAMESPACE, f"isvc/{NAME}", "--wait=false")
