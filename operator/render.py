"""spec -> manifests: every child of one InferenceService, and the ones to remove."""

from nanoserve.operator.autoscaling import render_autoscaler
from nanoserve.operator.engine import render_engine_deployment, render_engine_service
from nanoserve.operator.gateway import render_gateway_deployment, render_gateway_rbac, render_gateway_service
from nanoserve.operator.inference_pool import as_endpoint_picker, render_epp_service, render_inference_pool
from nanoserve.operator.model_cache import render_cache_pvc
from nanoserve.operator.names import ENGINE_PORT, engine_name, gateway_name, labels, selector, service_name
from nanoserve.operator.network_policy import render_network_policy


def render(name: str, namespace: str, spec: dict, keda: bool = False) -> list[dict]:
    """All children, in apply order (RBAC before the pods that use it). Owners are added by the caller.
    keda: the cluster serves KEDA's ScaledObject (found by the caller)."""
    cache = render_cache_pvc(name, spec)  # before the pods that mount it
    objs = [cache] if cache else []
    objs += [render_engine_service(name), render_engine_deployment(name, spec), render_pdb(name, "engine")]
    if spec.get("autoscaling"):
        objs.append(render_autoscaler(name, namespace, spec, keda))
    if spec.get("networkPolicy", {}).get("enabled"):
        objs.append(render_network_policy(name, spec))
    if spec["gateway"]["enabled"]:
        objs += render_gateway_rbac(name, spec)
        gateway = render_gateway_deployment(name, namespace, spec, keda)
        pooled = spec.get("router") == "inferencePool"  # the gateway is the pool's endpoint picker too
        objs += [render_gateway_service(name), as_endpoint_picker(gateway) if pooled else gateway]
        objs.append(render_pdb(name, "gateway"))
        if pooled:  # last: where GAIE's CRD is missing the pool is refused, and everything else is in place
            objs += [render_epp_service(name), render_inference_pool(name)]
    return objs


def render_pdb(name: str, component: str) -> dict:
    """A node drain (or any voluntary eviction) takes one pod of the component at a time; a pod that is not
    ready anyway may always go (it serves nothing, and must not block the drain)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": component_name(name, component), "labels": labels(name, component)},
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector(name, component)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def component_name(name: str, component: str) -> str:
    return engine_name(name) if component == "engine" else gateway_name(name)


# The optional parts at a spec that turns each on: what a previous spec may have rendered.
_EVERYTHING = {
    "gateway": {"enabled": True},
    "autoscaling": {
        "minReplicas": 1,
        "maxReplicas": 1,
        "metric": "m",
        "averageValue": 1,
        "scaleDownStabilizationSeconds": 0,
        "prometheusAddress": "http://p",
    },
    "networkPolicy": {"enabled": True},
    "router": "inferencePool",
}


def render_stale(name: str, namespace: str, spec: dict, keda: bool = False) -> list[dict]:
    """Children that a previous spec produced and this one does not (the gateway when disabled, the
    autoscaler or the network policy when turned off, the InferencePool and its picker's Service when the
    router goes back to the gateway alone, the HPA or the ScaledObject when KEDA comes or goes)."""
    everything = {**spec, "gateway": {**spec["gateway"], **_EVERYTHING["gateway"]}}
    everything["autoscaling"] = {**_EVERYTHING["autoscaling"], **spec.get("autoscaling", {})}
    everything["autoscaling"].setdefault("prometheusAddress", "http://p")
    everything["networkPolicy"] = {**spec.get("networkPolicy", {}), **_EVERYTHING["networkPolicy"]}
    everything["router"] = _EVERYTHING["router"]
    wanted = {(o["kind"], o["metadata"]["name"]) for o in render(name, namespace, spec, keda)}
    # Both autoscalers could have been made (KEDA installed or removed since); each once.
    maybe = {
        (o["kind"], o["metadata"]["name"]): o for k in (False, True) for o in render(name, namespace, everything, k)
    }
    return [o for key, o in maybe.items() if key not in wanted]


def service_url(name: str, namespace: str, spec: dict) -> str:
    """Where clients reach the service: the gateway, or the engines directly without one."""
    if spec["gateway"]["enabled"]:
        return f"http://{service_name(name)}.{namespace}.svc"
    return f"http://{engine_name(name)}.{namespace}.svc:{ENGINE_PORT}"
