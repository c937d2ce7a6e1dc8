"""spec.autoscaling -> a HorizontalPodAutoscaler on the InferenceService's own scale subresource: it sets
spec.replicas, which the operator then rolls out like any edit (so `kubectl scale`, the HPA and the
operator never fight over the engine Deployment's replicas). At 0 replicas (scaleToZero) an HPA does nothing
(scaling disabled) until the gateway raises the scale to 1."""

from nanoserve.operator.keda import render_scaled_object
from nanoserve.operator.names import engine_name, labels, scale_target_ref


def uses_keda(spec: dict, keda: bool) -> bool:
    """KEDA's ScaledObject where the cluster serves it and the spec names a Prometheus; the HPA otherwise."""
    return keda and bool((spec.get("autoscaling") or {}).get("prometheusAddress"))


def render_autoscaler(name: str, namespace: str, spec: dict, keda: bool) -> dict:
    return render_scaled_object(name, namespace, spec) if uses_keda(spec, keda) else render_hpa(name, spec)


def render_hpa(name: str, spec: dict) -> dict:
    auto = spec["autoscaling"]
    target = {"type": "AverageValue", "averageValue": auto["averageValue"]}
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": engine_name(name), "labels": labels(name, "engine")},
        "spec": {
            "scaleTargetRef": scale_target_ref(name),
            "minReplicas": auto["minReplicas"],
            "maxReplicas": auto["maxReplicas"],
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": auto["metric"]}, "target": target}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": auto["scaleDownStabilizationSeconds"]}},
        },
    }
