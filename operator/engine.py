"""Pure rendering of the engine: a GPU Deployment and the headless Service the gateway discovers."""

import re

from nanoserve.engine_pod.config import engine_argv
from nanoserve.operator.model import model_source, served_model_name
from nanoserve.operator.model_cache import cache_claim
from nanoserve.operator.names import ENGINE_PORT, engine_name, labels, selector
from nanoserve.operator.pod_overrides import apply_pod_overrides
from nanoserve.operator.security import container_security, pod_security

DRAIN_SECONDS = 15  # preStop pause: endpoints leave the gateway's view before SIGTERM
GRACE_SECONDS = 120  # then in-flight generations get this long to finish


def engine_args(spec: dict, model_arg: str) -> list[str]:
    """The engine's Config settings (spec.engine's fields are Config's, in camelCase; an unset one takes the
    engine's default for its device), then the server's flags, then extraArgs (last: they win)."""
    eng = spec["engine"]
    settings = {"model": model_arg, "tensor_parallel_size": spec["tensorParallelSize"]}
    settings |= {snake_case(key): value for key, value in eng.items() if key not in ("extraArgs", "pod")}
    server = ["--served-model-name", served_model_name(spec), "--host", "0.0.0.0", "--port", str(ENGINE_PORT)]
    return engine_argv(settings) + server + list(eng.get("extraArgs", []))


def snake_case(key: str) -> str:
    """maxNumSeqs -> max_num_seqs."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def engine_resources(spec: dict) -> dict:
    """Sized per GPU by default; the spec's overrides win key by key; GPUs always follow TP."""
    tp = spec["tensorParallelSize"]
    if spec["device"] == "gpu":
        requests = {"cpu": str(4 * tp), "memory": f"{24 * tp}Gi"}
        limits = {"memory": f"{24 * tp}Gi"}
    else:
        requests, limits = {"cpu": "2", "memory": "4Gi"}, {"memory": "4Gi"}
    overrides = spec.get("resources", {})
    requests |= overrides.get("requests", {})
    limits |= overrides.get("limits", {})
    if spec["device"] == "gpu":
        limits[gpu_resource(spec)] = tp
    return {"requests": requests, "limits": limits}


def gpu_resource(spec: dict) -> str:
    return spec.get("resources", {}).get("gpuResourceName") or "nvidia.com/gpu"


def render_engine_deployment(name: str, spec: dict) -> dict:
    claim = cache_claim(name, spec)
    model_arg, volumes, mounts, init_containers = model_source(spec["model"], spec["image"], claim)
    tp = spec["tensorParallelSize"]
    env: list[dict] = [
        {"name": "HOME", "value": "/cache"},  # read-only root: every cache goes to the cache volume
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "TRITON_CACHE_DIR", "value": "/cache/triton"},
    ]
    if spec.get("apiKeySecret"):
        env.append(
            {
                "name": "NANOSERVE_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": spec["apiKeySecret"], "key": "api-key"}},
            }
        )
    http = lambda path: {"httpGet": {"path": path, "port": "http"}}  # noqa: E731
    container = {
        "name": "engine",
        "image": spec["image"],
        "command": ["nanoserve", "serve"],
        "args": engine_args(spec, model_arg),
        "ports": [{"name": "http", "containerPort": ENGINE_PORT, "protocol": "TCP"}],
        "env": env,
        "resources": engine_resources(spec),
        # Loading (and compiling CUDA graphs for) a big model takes minutes: allow 30 before liveness.
        "startupProbe": {**http("/health"), "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": {**http("/ready"), "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**http("/health"), "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
        "lifecycle": {"preStop": {"sleep": {"seconds": DRAIN_SECONDS}}},
        "securityContext": container_security(),
        "volumeMounts": mounts
        + [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    volumes = volumes + [
        # NCCL and the engine's worker channel use shared memory; the runtime's default is 64 MiB.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{2 * tp}Gi"}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    for init in init_containers:
        init["securityContext"] = container_security()
    # GPUs are scarce: replace pods one at a time instead of surging onto GPUs that may not exist.
    gpu = spec["device"] == "gpu"
    strategy = {"maxSurge": 0 if gpu else 1, "maxUnavailable": 1 if gpu else 0}
    security = pod_security()
    if claim:  # a big cache volume: the kubelet re-owns it to fsGroup only when its root does not match yet
        security["fsGroupChangePolicy"] = "OnRootMismatch"
    pod_spec = {
        "securityContext": security,
        "terminationGracePeriodSeconds": DRAIN_SECONDS + GRACE_SECONDS,
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": volumes,
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    if gpu:
        pod_spec["tolerations"] = [{"key": gpu_resource(spec), "operator": "Exists", "effect": "NoSchedule"}]
    template = {"metadata": {"labels": labels(name, "engine")}, "spec": pod_spec}
    apply_pod_overrides(template, container, spec["engine"].get("pod"))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": engine_name(name), "labels": labels(name, "engine")},
        "spec": {
            "replicas": spec["replicas"],
            "selector": {"matchLabels": selector(name, "engine")},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": strategy},
            "template": template,
        },
    }


def render_engine_service(name: str) -> dict:
    """Headless: the gateway routes to individual pods (prefix affinity), never through a VIP."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": engine_name(name), "labels": labels(name, "engine")},
        "spec": {
            "clusterIP": "None",
            "selector": selector(name, "engine"),
            "ports": [{"name": "http", "port": ENGINE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
