"""The user's path in a cluster: `kubectl apply` an InferenceService, and the gateway the operator renders
routes by the engines' prefix caches.

A real kopf operator renders the Deployments into the emulated API server; their containers run here as
processes (pods.py: the rendered command, args and env, the image's ENV); the EndpointSlices that the
endpoints controller would publish go into the emulator, where the gateway's real watch finds them. The
gateway gets no tokenizer flag: it must fetch and verify the engines' own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
from dataclasses import dataclass

import aiohttp
import pytest
from conversations import Conversation, chat, run_conversations, total_hits
from op_harness import NAMESPACE
from pods import Pod, endpoint_slice
from poll import until, until_async

from nanoserve.gateway.endpoints import engine_id

ENGINE = {"maxModelLen": 1024, "maxNumSeqs": 16, "maxNumBatchedTokens": 1024, "enforceEager": True}
# Conversations coprime with replicas: round-robin moves every conversation every turn. Each engine is a
# process that imports torch and loads its model: two replicas of the tiny model, where routing is compared
# with round-robin. The builtin model is real (and slow on CPU): one replica, where the gateway's block hashes
# from the engine's own tokenizer must find what the engine cached; turns of 6-9 words ("w123" is 4 tokens).
VARIANTS = {
    "builtin": dict(
        model={"builtin": "smollm2-135m"}, replicas=1, conversations=2, turns=2, words=(6, 10), served="smollm2-135m"
    ),
    "pvc": dict(
        model={"pvc": "models", "path": "qwen3/tiny"},
        replicas=2,
        conversations=3,
        turns=3,
        words=(15, 25),
        served="qwen3/tiny",
    ),
}
# Short replies; each conversation its own system prompt.
TALK = dict(max_tokens=2, shared_system=False)
_subnet = itertools.count(1)


@dataclass
class Stack:
    name: str
    served: str
    conversations: int
    turns: int
    words: tuple[int, int]
    engines: list[Pod]
    gateway: Pod
    kubeconfig: str
    tmp: object
    ended: bool = False

    def rendered(self, component: str, kubectl, where=lambda dep: True) -> dict:
        """The component's Deployment once the operator has rendered it as `where` wants it."""
        return until(
            lambda: (d := kubectl.get("deployment", f"{self.name}-{component}")) and where(d) and d,
            what=f"the {component} Deployment",
        )

    def gateway_pod(self, deployment: dict, ip: str) -> Pod:
        # The ServiceAccount's credentials, as the in-cluster config would find them.
        return Pod(deployment, ip, self.tmp / f"gateway-{ip}", env={"KUBECONFIG": self.kubeconfig})


def seed_model(pod: Pod, variant: str, default_model_path: str, tiny_model: str) -> None:
    """What the pod's volumes hold at start: the builtin model already converted in the cache volume (saves
    converting it per pod), or the model folder on the PVC."""
    if variant == "builtin":
        cache = os.path.join(pod.path("/cache"), ".cache", "nanoserve")
        os.makedirs(cache, exist_ok=True)
        os.symlink(default_model_path, os.path.join(cache, "smollm2-135m-instruct"))
    else:
        folder = pod.path("/models/qwen3/tiny")
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        shutil.copytree(tiny_model, folder)


def begin_stack(variant: str, kubectl, cluster, tmp_path_factory, default_model_path: str, tiny_models) -> Stack:
    """`kubectl apply` the variant's InferenceService and start the engine pods and the gateway pod it renders
    (not yet ready: the gateway finds the engines by their EndpointSlices once they are)."""
    v = VARIANTS[variant]
    name, net = f"routed-{variant}", next(_subnet)
    tmp = tmp_path_factory.mktemp(name)
    if "pvc" in v["model"]:
        kubectl.apply(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": "models"},
                "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}},
            }
        )
    kubectl.apply(
        {
            "apiVersion": "serving.nanoserve.io/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": name},
            "spec": {"device": "cpu", "model": v["model"], "replicas": v["replicas"], "engine": ENGINE},
        }
    )
    stack = Stack(
        name, v["served"], v["conversations"], v["turns"], v["words"], [], None, cluster.env["KUBECONFIG"], tmp
    )
    engine_dep = stack.rendered("engine", kubectl)
    try:
        for i in range(v["replicas"]):
            pod = Pod(engine_dep, f"127.0.{net}.{10 + i}", tmp / f"engine-{i}")
            seed_model(pod, variant, default_model_path, tiny_models["qwen3"])
            stack.engines.append(pod.start())
        stack.gateway = stack.gateway_pod(stack.rendered("gateway", kubectl), f"127.0.{net}.2").start()
    except BaseException:
        end_stack(stack, kubectl)
        raise
    return stack


def finish_stack(stack: Stack, kubectl) -> None:
    """Once its engines are ready: their EndpointSlices, then the gateway, ready (it routes to them)."""
    for pod in stack.engines:
        pod.wait_ready()
        kubectl.apply(endpoint_slice(f"{stack.name}-engine", pod))  # ready: the endpoints controller lists it
    stack.gateway.wait_ready()


def end_stack(stack: Stack, kubectl) -> None:
    if stack.ended:
        return
    stack.ended = True
    for pod in stack.engines + [stack.gateway]:
        if pod is not None:
            pod.kill()
    kubectl("delete", "-n", NAMESPACE, f"isvc/{stack.name}", "--wait=false")


@pytest.fixture(scope="module")
def stacks(request, kubectl, operator, cluster, tmp_path_factory, default_model_path, tiny_models):
    """The stacks of every variant that this run's tests use, begun together at the module's first test: an
    engine's start is mostly the latency of one core (imports, loading), so the two variants' four engines
    boot in about the time of the slower two."""
    wanted = {
        item.callspec.params["stack"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        and hasattr(item, "callspec")
        and "stack" in item.callspec.params
    }
    begun: dict[str, Stack] = {}
    try:
        for variant in (v for v in VARIANTS if v in wanted):
            begun[variant] = begin_stack(variant, kubectl, cluster, tmp_path_factory, default_model_path, tiny_models)
        yield begun
    finally:
        for stack in begun.values():
            end_stack(stack, kubectl)


@pytest.fixture(scope="module")
def stack(request, stacks, kubectl):
    """One variant's stack, ready; ended after its tests (its engines' cores and memory go to the next)."""
    stack = stacks[request.param]
    try:
        finish_stack(stack, kubectl)
        yield stack
    finally:
        end_stack(stack, kubectl)


async def gateway_metrics(session: aiohttp.ClientSession, gw: Pod) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = await (await session.get(gw.url + "/metrics")).text()
    return {
        s.name + json.dumps(s.labels, sort_keys=True): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


async def wait_metric(session, gw: Pod, key: str, want: float | None) -> None:
    """Until the gateway's metric sample `key` has value `want` (None: until it is gone)."""

    async def reached() -> bool:
        return (await gateway_metrics(session, gw)).get(key) == want

    await until_async(reached, f"{key} to be {want}")


async def gateway_ready_by_tokens(session: aiohttp.ClientSession, stack: Stack) -> None:
    """Until the gateway matches prompts by tokens (it has the engines' tokenizer); it serves the model by the
    name the user gave."""
    gw = stack.gateway
    await wait_metric(session, gw, 'nanoserve_gateway_routing_mode{"mode": "tokens"}', 1.0)
    models = await (await session.get(gw.url + "/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [stack.served]


@pytest.mark.parametrize("stack", ["builtin"], indirect=True)
def test_the_builtin_models_gateway_matches_prompts_by_the_engines_own_tokenizer(stack):
    """The gateway got no tokenizer: it fetched the engine's (SmolLM2's), and the blocks it hashes from a
    conversation's next turn are the blocks the engine cached from the turn before."""

    async def main():
        async with aiohttp.ClientSession() as s:
            gw = stack.gateway
            await gateway_ready_by_tokens(s, stack)
            convs = await run_conversations(
                gw.url, stack.conversations, stack.turns, 0, stack.served, words=stack.words, **TALK
            )
            assert all(c.engines == [engine_id(stack.engines[0].url)] * stack.turns for c in convs)
            m = await gateway_metrics(s, gw)
            assert m['nanoserve_gateway_prompt_match_mode_total{"mode": "tokens"}'] == stack.turns * stack.conversations
            # Second turns start with the first turn's ~80 tokens: at least 2 of its blocks of 16 were matched.
            assert m["nanoserve_gateway_matched_blocks_sum{}"] >= 2 * stack.conversations

    asyncio.run(main())


@pytest.mark.parametrize("stack", ["pvc"], indirect=True)
def test_the_rendered_gateway_routes_by_the_engines_prefix_caches(stack, kubectl):
    async def main():
        async with aiohttp.ClientSession() as s:
            gw = stack.gateway
            await gateway_ready_by_tokens(s, stack)
            before = await total_hits(s, stack.engines)
            convs = await run_conversations(
                gw.url, stack.conversations, stack.turns, 0, stack.served, words=stack.words, **TALK
            )
            cache_aware = await total_hits(s, stack.engines) - before
            assert all(len(set(c.engines)) == 1 for c in convs)  # every conversation stays on its engine
            assert len({c.engines[0] for c in convs}) > 1  # and they spread over the engines
            m = await gateway_metrics(s, gw)
            assert m['nanoserve_gateway_prompt_match_mode_total{"mode": "tokens"}'] == stack.turns * stack.conversations

            # The same InferenceService switched to round-robin: a second gateway, rendered anew, same engines.
            kubectl(
                "patch",
                "isvc",
                stack.name,
                "-n",
                NAMESPACE,
                "--type=merge",
                "-p",
                json.dumps({"spec": {"gateway": {"policy": "round-robin"}}}),
            )
            dep = stack.rendered(
                "gateway", kubectl, lambda d: "round-robin" in d["spec"]["template"]["spec"]["containers"][0]["args"]
            )
            rr = stack.gateway_pod(dep, stack.gateway.ip.rsplit(".", 1)[0] + ".3").start()
            try:
                rr.wait_ready()
                before = await total_hits(s, stack.engines)
                await run_conversations(
                    rr.url, stack.conversations, stack.turns, 100, stack.served, words=stack.words, **TALK
                )
                round_robin = await total_hits(s, stack.engines) - before
            finally:
                rr.kill()
            assert cache_aware > 2 * round_robin, (cache_aware, round_robin)

    asyncio.run(main())


@pytest.mark.parametrize("stack", ["pvc"], indirect=True)  # the model does not matter here
def test_a_conversation_moves_when_its_engine_goes_away(stack, kubectl):
    async def main():
        async with aiohttp.ClientSession() as s:
            gw = stack.gateway
            (conv,) = await run_conversations(gw.url, 1, 2, 200, stack.served, words=stack.words, **TALK)
            (home,) = set(conv.engines)
            pod = next(p for p in stack.engines if engine_id(p.url) == home)  # the header names engines by id
            kubectl("delete", "endpointslice", f"{stack.name}-engine-{pod.ip.replace('.', '-')}", "-n", NAMESPACE)
            await wait_metric(s, gw, f'nanoserve_gateway_engine_up{{"engine": "{pod.url}"}}', None)
            status, _ = await chat(s, gw.url, conv)
            assert status == 200 and conv.engines[-1] != home
            kubectl.apply(endpoint_slice(f"{stack.name}-engine", pod))  # back for the next test
            await wait_metric(s, gw, f'nanoserve_gateway_engine_up{{"engine": "{pod.url}"}}', 1.0)

    asyncio.run(main())


@pytest.mark.parametrize("stack", ["pvc"], indirect=True)
def test_sigterm_lets_the_gateways_open_streams_finish(stack):
    """A rolling update of the gateway: after preStop, SIGTERM; open streams end normally, then it exits 0."""

    async def main():
        async with aiohttp.ClientSession() as s:
            conv = Conversation(300, stack.served, max_tokens=200, words=(15, 25))
            body = {**conv.next_request(stream=True), "ignore_eos": True}
            async with s.post(stack.gateway.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                first = await resp.content.readline()
                assert first.startswith(b"data: ")
                code = asyncio.create_task(asyncio.to_thread(stack.gateway.terminate))
                rest = (first + await resp.content.read()).decode()
            events = [line[6:] for line in rest.split("\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert sum(1 for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]) == 1
            assert await code == 0

    asyncio.run(main())
