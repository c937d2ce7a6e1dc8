"""spec.autoscaling where KEDA is installed -> a ScaledObject (keda.sh/v1alpha1) on the InferenceService's own
scale subresource, fed by a Prometheus query, instead of an HPA that needs a custom metrics adapter.

KEDA makes and owns the HPA itself; the operator only writes the ScaledObject. With scaleToZero, KEDA scales
to zero after idleSeconds (minReplicaCount 0, cooldownPeriod) and the gateway's held requests wake it."""

from nanoserve.operator.names import engine_name, gateway_name, labels, scale_target_ref

API_VERSION = "keda.sh/v1alpha1"
_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}


def threshold(quantity: int | str) -> str:
    """A Kubernetes quantity ("500m", 4) as the plain number KEDA's prometheus trigger parses."""
    s = str(quantity)
    if s[-1:] in _SUFFIXES:
        return f"{float(s[:-1]) * _SUFFIXES[s[-1]]:g}"
    return f"{float(s):g}"


def engine_query(name: str, namespace: str, metric: str) -> str:
    """The metric summed over this InferenceService's engine pods (KEDA's AverageValue divides by replicas).
    Prometheus knows pods by namespace and pod name (the engine Deployment's pods are <name>-engine-...)."""
    return f'sum({metric}{{namespace="{namespace}",pod=~"{engine_name(name)}-.*"}})'


def held_query(name: str, namespace: str) -> str:
    """Requests the gateway pods hold for an engine to start: what wakes a service at zero engines, whose
    engine metrics then do not exist."""
    return f'sum(nanoserve_gateway_held_requests{{namespace="{namespace}",pod=~"{gateway_name(name)}-.*"}})'


def render_scaled_object(name: str, namespace: str, spec: dict) -> dict:
    auto = spec["autoscaling"]
    window = auto["scaleDownStabilizationSeconds"]
    zero = spec.get("scaleToZero") or {}
    to_zero = bool(zero.get("enabled")) and zero.get("idleSeconds", 600) > 0
    query = engine_query(name, namespace, auto["metric"])
    if to_zero:  # KEDA activates from zero when the sum is above 0 (its activationThreshold)
        query = f"({query} or vector(0)) + ({held_query(name, namespace)} or vector(0))"
    trigger = {
        "type": "prometheus",
        "metricType": "AverageValue",
        "metadata": {
            "serverAddress": auto["prometheusAddress"],
            "query": query,
            "threshold": threshold(auto["averageValue"]),
        },
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "ScaledObject",
        "metadata": {"name": engine_name(name), "labels": labels(name, "engine")},
        "spec": {
            "scaleTargetRef": scale_target_ref(name),
            "minReplicaCount": 0 if to_zero else auto["minReplicas"],
            "maxReplicaCount": auto["maxReplicas"],
            # cooldownPeriod only governs scaling to zero; scale-down between replicas is the HPA's window.
            "cooldownPeriod": zero.get("idleSeconds", 600) if to_zero else window,
            "advanced": {
                "horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": {"stabilizationWindowSeconds": window}}}
            },
            "triggers": [trigger],
        },
    }
