"""spec.autoscaling where KEDA is installed -> a ScaledObject (keda.sh/v1alpha1) on the InferenceService's own
scale subresource, fed by a Prometheus query, instead of an HPA that needs a custom metrics adapter.

KEDA makes and owns the HPA itself; the operator only writes the ScaledObject."""

from nanoserve.operator.names import engine_name, labels, scale_target_ref

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


def render_scaled_object(name: str, namespace: str, spec: dict) -> dict:
    auto = spec["autoscaling"]
    window = auto["scaleDownStabilizationSeconds"]
    trigger = {
        "type": "prometheus",
        "metricType": "AverageValue",
        "metadata": {
            "serverAddress": auto["prometheusAddress"],
            "query": engine_query(name, namespace, auto["metric"]),
            "threshold": threshold(auto["averageValue"]),
        },
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "ScaledObject",
        "metadata": {"name": engine_name(name), "labels": labels(name, "engine")},
        "spec": {
            "scaleTargetRef": scale_target_ref(name),
            "minReplicaCount": auto["minReplicas"],
            "maxReplicaCount": auto["maxReplicas"],
            # cooldownPeriod only governs scaling to zero; scale-down between replicas is the HPA's window.
            "cooldownPeriod": window,
            "advanced": {
                "horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": {"stabilizationWindowSeconds": window}}}
            },
            "triggers": [trigger],
        },
    }
