"""Pure rendering: every child is a valid Kubernetes 1.37 object and wires up as the design says."""

import copy
import pathlib

import kubernetes_validate
import pytest
import yaml
from crd_schema import default_spec

from nanoserve.operator.engine import DRAIN_SECONDS
from nanoserve.operator.render import render, render_stale, service_url

EXAMPLES = sorted((pathlib.Path(__file__).parents[2] / "examples").glob("inferenceservice*.yaml"))

ENGINE_POD = {
    "annotations": {"team": "ml"},
    "nodeSelector": {"gpu": "h200"},
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]
            }
        }
    },
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
    "topologySpreadConstraints": [
        {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}
    ],
    "priorityClassName": "inference",
    "runtimeClassName": "nvidia",
    "imagePullSecrets": [{"name": "registry"}],
    "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
    "volumes": [{"name": "certs", "secret": {"secretName": "certs"}}],
    "volumeMounts": [{"name": "certs", "mountPath": "/certs", "readOnly": True}],
}

PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}

SPECS = {
    "defaults": {},
    "cpu builtin": {"device": "cpu"},
    "hf tp4": {"model": {"name": "Qwen/Qwen3-0.6B"}, "tensorParallelSize": 4, "replicas": 3},
    "pvc": {
        "model": {"pvc": "models", "path": "qwen3/0.6b"},
        "engine": {"enforceEager": True, "maxNumBatchedTokens": 4096},
    },
    "no gateway": {"gateway": {"enabled": False}},
    "api key + overrides": {
        "apiKeySecret": "key",
        "resources": {"requests": {"cpu": 3}, "limits": {"memory": "9Gi"}},
        "engine": {"extraArgs": ["--scheduling-policy", "priority"]},
        "gateway": {"policy": "round-robin"},
    },
    "autoscaling": {"autoscaling": {"minReplicas": 2, "maxReplicas": 8, "averageValue": "500m"}},
    "network policy": {"networkPolicy": {"enabled": True, "allowFrom": [PROMETHEUS]}},
    "network policy, no gateway": {"networkPolicy": {"enabled": True}, "gateway": {"enabled": False}},
    "pod overrides": {
        "resources": {"gpuResourceName": "amd.com/gpu"},
        "engine": {"pod": ENGINE_POD},
        "gateway": {"pod": {"nodeSelector": {"pool": "cpu"}, "priorityClassName": "gateway-critical"}},
    },
    "gateway workers": {"gateway": {"workers": 3, "replicas": 2}},
    **{p.name: yaml.safe_load(p.read_text())["spec"] for p in EXAMPLES},
}


def children(spec: dict, name: str = "demo", namespace: str = "ml") -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in render(name, namespace, default_spec(spec))}


def engine_container(objs: dict) -> dict:
    (c,) = objs["Deployment", "demo-engine"]["spec"]["template"]["spec"]["containers"]
    return c


def flags(args: list[str]) -> dict[str, str | bool]:
    """--a 1 --b → {'--a': '1', '--b': True}."""
    out, i = {}, 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[args[i]], i = args[i + 1], i + 2
        else:
            out[args[i]], i = True, i + 1
    return out


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_every_child_is_valid_for_kubernetes_1_37(spec):
    for obj in children(spec).values():
        kubernetes_validate.validate(obj, "1.37", strict=True)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_render_is_pure(spec):
    full = default_spec(spec)
    before = copy.deepcopy(full)
    assert render("demo", "ml", full) == render("demo", "ml", full)
    assert full == before


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_engine_args_carry_the_spec(spec):
    full = default_spec(spec)
    c = engine_container(children(spec))
    assert c["command"] == ["nanoserve", "serve"]
    f = flags(c["args"])
    assert f["--port"] == str(c["ports"][0]["containerPort"])
    assert f["--tensor-parallel-size"] == str(full["tensorParallelSize"])
    # Unset: the model's max_position_embeddings, as vLLM.
    assert f.get("--max-model-len") == (str(full["engine"]["maxModelLen"]) if "maxModelLen" in full["engine"] else None)
    assert f["--max-num-seqs"] == str(full["engine"]["maxNumSeqs"])
    # Unset: the engine picks per device (8192 on GPU, a CPU step-time bound on CPU).
    assert f.get("--max-num-batched-tokens") == (
        str(full["engine"]["maxNumBatchedTokens"]) if "maxNumBatchedTokens" in full["engine"] else None
    )
    assert float(f["--gpu-memory-utilization"]) == full["engine"]["gpuMemoryUtilization"]
    assert f["--kvcache-block-size"] == str(full["engine"]["kvcacheBlockSize"])
    assert ("--enforce-eager" in f) == full["engine"]["enforceEager"]
    extra = full["engine"].get("extraArgs", [])
    assert c["args"][len(c["args"]) - len(extra) :] == extra


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_gpus_follow_tensor_parallel_size(spec):
    full = default_spec(spec)
    res = engine_container(children(spec))["resources"]
    gpus = res["limits"].get(full["resources"]["gpuResourceName"])
    assert gpus == (full["tensorParallelSize"] if full["device"] == "gpu" else None)
    for kind in ("requests", "limits"):
        for key, value in full.get("resources", {}).get(kind, {}).items():
            assert res[kind][key] == value


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_engine_pod_shape(spec):
    objs = children(spec)
    pod = objs["Deployment", "demo-engine"]["spec"]["template"]["spec"]
    c = engine_container(objs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # slow model loads
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] == DRAIN_SECONDS
    assert pod["terminationGracePeriodSeconds"] > DRAIN_SECONDS + 60  # time left to drain after preStop
    assert pod["securityContext"]["runAsNonRoot"] is True
    for cont in pod["containers"] + pod.get("initContainers", []):
        assert cont["securityContext"]["readOnlyRootFilesystem"] is True
        assert cont["securityContext"]["allowPrivilegeEscalation"] is False
        for m in cont["volumeMounts"]:
            assert m["name"] in volumes


def test_model_sources():
    c = engine_container(children({"model": {"builtin": "smollm2-135m"}}))
    assert flags(c["args"])["--model"] == "smollm2-135m"

    objs = children({"model": {"pvc": "models", "path": "qwen3/0.6b"}})
    c, pod = engine_container(objs), objs["Deployment", "demo-engine"]["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert vol["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    assert mount["readOnly"] and flags(c["args"])["--model"] == f"{mount['mountPath']}/qwen3/0.6b"

    objs = children({"model": {"name": "Qwen/Qwen3-0.6B"}})
    c, pod = engine_container(objs), objs["Deployment", "demo-engine"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    model_dir = flags(c["args"])["--model"]
    assert "hf://Qwen/Qwen3-0.6B" in init["command"] and model_dir in init["command"]
    shared = {m["name"] for m in init["volumeMounts"]} & {m["name"] for m in c["volumeMounts"]}
    assert any(model_dir.startswith(m["mountPath"]) for m in c["volumeMounts"] if m["name"] in shared)


@pytest.mark.parametrize(
    "model,served",
    [
        ({"builtin": "smollm2-135m"}, "smollm2-135m"),
        ({"name": "Qwen/Qwen3-0.6B"}, "Qwen/Qwen3-0.6B"),
        ({"pvc": "models", "path": "org/llama-3b"}, "org/llama-3b"),
    ],
)
def test_the_served_name_is_the_model_as_the_user_gave_it(model, served):
    """As vLLM names a model by its --model argument: the repo id, not the folder it lands in."""
    assert flags(engine_container(children({"model": model}))["args"])["--served-model-name"] == served
    named = children({"model": model, "servedModelName": "chat"})
    assert flags(engine_container(named)["args"])["--served-model-name"] == "chat"


def test_gateway_pod_drains_on_rolling_updates():
    pod = children({})["Deployment", "demo-gateway"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause > 0  # endpoints drop the pod before it stops listening
    assert pause + float(flags(c["args"])["--drain-timeout"]) < pod["terminationGracePeriodSeconds"]


def test_api_key_comes_from_the_secret():
    env = {e["name"]: e for e in engine_container(children({"apiKeySecret": "key"}))["env"]}
    assert env["NANOSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "key"
    assert "NANOSERVE_API_KEY" not in {e["name"] for e in engine_container(children({}))["env"]}


def test_services_select_their_pods_and_the_gateway_finds_the_engines():
    objs = children({})
    engine_svc, gw_svc = objs["Service", "demo-engine"], objs["Service", "demo"]
    engine_pods = objs["Deployment", "demo-engine"]["spec"]["template"]["metadata"]["labels"]
    gw_dep = objs["Deployment", "demo-gateway"]
    gw_pods = gw_dep["spec"]["template"]["metadata"]["labels"]
    assert engine_svc["spec"]["clusterIP"] == "None"
    assert engine_svc["spec"]["selector"].items() <= engine_pods.items()
    assert not engine_svc["spec"]["selector"].items() <= gw_pods.items()
    assert gw_svc["spec"]["selector"].items() <= gw_pods.items()
    for dep in (objs["Deployment", "demo-engine"], gw_dep):
        assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    f = flags(gw_dep["spec"]["template"]["spec"]["containers"][0]["args"])
    assert (f["--service"], f["--namespace"]) == ("demo-engine", "ml")
    assert f["--policy"] == "cache-aware"


def test_gateway_rbac_covers_endpointslice_discovery():
    objs = children({})
    sa = objs["Deployment", "demo-gateway"]["spec"]["template"]["spec"]["serviceAccountName"]
    binding = objs["RoleBinding", sa]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa}]
    (rule,) = objs["Role", binding["roleRef"]["name"]]["rules"]
    assert rule["apiGroups"] == ["discovery.k8s.io"] and rule["resources"] == ["endpointslices"]
    assert set(rule["verbs"]) == {"get", "list", "watch"}


def test_disabling_the_gateway_removes_exactly_its_objects():
    with_gw, without = children({}), children({"gateway": {"enabled": False}})
    stale = render_stale("demo", "ml", default_spec({"gateway": {"enabled": False}}))
    # Stale too, never made or turned off: the autoscaler, the network policy, the InferencePool and its picker.
    optional = {("HorizontalPodAutoscaler", "demo-engine"), ("ScaledObject", "demo-engine")}
    optional |= {("NetworkPolicy", "demo-engine")}
    optional |= {("InferencePool", "demo"), ("Service", "demo-epp")}
    assert {(o["kind"], o["metadata"]["name"]) for o in stale} == set(with_gw) - set(without) | optional
    assert {(o["kind"], o["metadata"]["name"]) for o in render_stale("demo", "ml", default_spec({}))} == optional
    everything = default_spec(
        {"autoscaling": {"maxReplicas": 2}, "networkPolicy": {"enabled": True}, "router": "inferencePool"}
    )
    # The one autoscaler not in use (KEDA's ScaledObject here: the cluster has no KEDA) is stale.
    assert {(o["kind"], o["metadata"]["name"]) for o in render_stale("demo", "ml", everything)} == {
        ("ScaledObject", "demo-engine")
    }
    assert "demo-engine" in service_url("demo", "ml", default_spec({"gateway": {"enabled": False}}))
    assert service_url("demo", "ml", default_spec({})).startswith("http://demo.ml.svc")


def test_api_key_reaches_the_gateway_too():
    (c,) = children({"apiKeySecret": "key"})["Deployment", "demo-gateway"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NANOSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "key"


def test_the_crds_engine_fields_are_config_settings_at_its_defaults():
    """spec.engine's fields are the engine's Config settings in camelCase (rendered through engine_argv), and a
    default the CRD gives is the engine's own; the gateway's policies are the gateway's."""
    import dataclasses

    from crd_schema import load_crd, version_schema

    from nanoserve.engine_pod.config import Config
    from nanoserve.gateway.config import POLICIES
    from nanoserve.operator.engine import snake_case

    spec = version_schema(load_crd())["properties"]["spec"]["properties"]
    settings = {f.name: f for f in dataclasses.fields(Config) if f.init}
    engine = {key: prop for key, prop in spec["engine"]["properties"].items() if key not in ("extraArgs", "pod")}
    assert engine and {snake_case(key) for key in engine} <= settings.keys()
    for key, prop in engine.items():
        assert prop.get("default", settings[snake_case(key)].default) == settings[snake_case(key)].default, key
    assert spec["tensorParallelSize"]["default"] == settings["tensor_parallel_size"].default
    assert tuple(spec["gateway"]["properties"]["policy"]["enum"]) == POLICIES


def test_pod_overrides_join_what_the_operator_renders():
    objs = children(SPECS["pod overrides"])
    template = objs["Deployment", "demo-engine"]["spec"]["template"]
    pod, c = template["spec"], engine_container(objs)
    for key in ("nodeSelector", "affinity", "topologySpreadConstraints", "priorityClassName", "runtimeClassName"):
        assert pod[key] == ENGINE_POD[key], key
    assert template["metadata"]["annotations"] == {"team": "ml"}
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    # The operator's own entries stay, the user's come after them.
    assert (
        pod["tolerations"]
        == [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}] + ENGINE_POD["tolerations"]
    )
    assert c["resources"]["limits"]["amd.com/gpu"] == 1 and "nvidia.com/gpu" not in c["resources"]["limits"]
    assert c["env"][-1] == {"name": "NCCL_DEBUG", "value": "INFO"} and {"HF_HOME"} <= {e["name"] for e in c["env"]}
    assert {v["name"] for v in pod["volumes"]} >= {"certs", "dshm", "cache", "tmp"}
    assert c["volumeMounts"][-1] == ENGINE_POD["volumeMounts"][0]
    gw = objs["Deployment", "demo-gateway"]["spec"]["template"]["spec"]
    assert gw["nodeSelector"] == {"pool": "cpu"} and gw["priorityClassName"] == "gateway-critical"
    assert (
        "affinity" not in gw and "affinity" not in children({})["Deployment", "demo-engine"]["spec"]["template"]["spec"]
    )


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_a_disruption_budget_lets_one_pod_of_each_component_go_at_a_time(spec):
    objs, full = children(spec), default_spec(spec)
    components = ["engine"] + (["gateway"] if full["gateway"]["enabled"] else [])
    pdbs = {name: o for (kind, name), o in objs.items() if kind == "PodDisruptionBudget"}
    assert set(pdbs) == {f"demo-{c}" for c in components}
    for c in components:
        pods = objs["Deployment", f"demo-{c}"]["spec"]["template"]["metadata"]["labels"]
        budget = pdbs[f"demo-{c}"]["spec"]
        assert budget["maxUnavailable"] == 1 and budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        assert budget["selector"]["matchLabels"].items() <= pods.items()


def test_autoscaling_scales_the_inference_service_by_an_engine_metric_per_pod():
    spec = {"autoscaling": {"maxReplicas": 8}}
    hpa = children(spec)["HorizontalPodAutoscaler", "demo-engine"]["spec"]
    # The HPA drives the InferenceService's scale subresource (spec.replicas), never the Deployment itself.
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "serving.nanoserve.io/v1alpha1",
        "kind": "InferenceService",
        "name": "demo",
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 8)
    (metric,) = hpa["metrics"]
    assert metric["pods"] == {
        "metric": {"name": "vllm:num_requests_waiting"},
        "target": {"type": "AverageValue", "averageValue": 4},
    }
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert ("HorizontalPodAutoscaler", "demo-engine") not in children({})


def test_the_network_policy_lets_only_the_gateway_and_allow_from_reach_the_engines():
    objs = children(SPECS["network policy"])
    policy = objs["NetworkPolicy", "demo-engine"]["spec"]
    engine_pods = objs["Deployment", "demo-engine"]["spec"]["template"]["metadata"]["labels"]
    gateway_pods = objs["Deployment", "demo-gateway"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= engine_pods.items() and policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    gateway_peer, prometheus = rule["from"]
    assert gateway_peer["podSelector"]["matchLabels"].items() <= gateway_pods.items()
    assert not gateway_peer["podSelector"]["matchLabels"].items() <= engine_pods.items()  # not the engines' own
    assert prometheus == PROMETHEUS and rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    # Without a gateway and without allowFrom nothing may reach the engines: an empty ingress list.
    alone = children(SPECS["network policy, no gateway"])["NetworkPolicy", "demo-engine"]["spec"]
    assert alone["ingress"] == []
    assert ("NetworkPolicy", "demo-engine") not in children({})
