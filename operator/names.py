"""Names and labels shared by the rendered children (the gateway selects engines by these)."""

GROUP = "serving.nanoserve.io"
VERSION = "v1alpha1"
PLURAL = "inferenceservices"
MANAGER = "nanoserve-operator"  # server-side apply field manager

ENGINE_PORT = 8000
GATEWAY_PORT = 8080


def engine_name(isvc: str) -> str:
    return f"{isvc}-engine"


def gateway_name(isvc: str) -> str:
    return f"{isvc}-gateway"


def service_name(isvc: str) -> str:
    # The client-facing Service carries the InferenceService's own name.
    return isvc


def selector(isvc: str, component: str) -> dict[str, str]:
    """Labels that select one component's pods; immutable once a Deployment exists."""
    return {"app.kubernetes.io/instance": isvc, "app.kubernetes.io/component": component}


def labels(isvc: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "nanoserve", "app.kubernetes.io/managed-by": MANAGER, **selector(isvc, component)}


def selector_string(isvc: str, component: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(isvc, component).items())


def scale_target_ref(isvc: str) -> dict[str, str]:
    """An autoscaler's target: the InferenceService's own scale subresource (it sets spec.replicas)."""
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService", "name": isvc}
