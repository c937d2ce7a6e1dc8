"""A thin, untyped Kubernetes client: server-side apply, get and delete of plain dicts.

Dicts in and out (no generated models): the renderer's output goes to the API server unchanged.
"""

import functools
import json

import kubernetes

from nanoserve.operator.names import MANAGER

# Plural of each kind the operator touches; the API paths are built from them.
PLURALS = {
    "Pod": "pods",
    "Deployment": "deployments",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "NetworkPolicy": "networkpolicies",
    "InferencePool": "inferencepools",
    "InferenceService": "inferenceservices",
    "ScaledObject": "scaledobjects",
}


class ApiError(Exception):
    def __init__(self, status: int, body: dict):
        self.status, self.body = status, body
        super().__init__(f"{status} {body.get('reason', '')}: {body.get('message', body)}")


def load_config() -> None:
    """In a pod: the service account; elsewhere: $KUBECONFIG / ~/.kube/config."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


def path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    p = f"{prefix}/namespaces/{namespace}/{PLURALS[kind]}"
    return f"{p}/{name}" if name else p


@functools.cache
def _client() -> kubernetes.client.ApiClient:
    return kubernetes.client.ApiClient()  # after load_config(); its connection pool is thread-safe


def _call(
    method: str, url: str, body: dict | None = None, query: list | None = None, content_type: str = "application/json"
) -> dict:
    api = _client()
    params = api.param_serialize(
        method,
        url,
        query_params=query or [],
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
    )
    resp = api.call_api(*params)
    data = json.loads(resp.read() or b"{}")
    if not 200 <= resp.status < 300:
        raise ApiError(resp.status, data)
    return data


def apply(obj: dict, namespace: str) -> dict:
    """Server-side apply: creates if missing, takes back the fields we own if edited by hand."""
    url = path(obj["apiVersion"], obj["kind"], namespace, obj["metadata"]["name"])
    return _call("PATCH", url, obj, [("fieldManager", MANAGER), ("force", "true")], "application/apply-patch+yaml")


def get(api_version: str, kind: str, namespace: str, name: str) -> dict | None:
    try:
        return _call("GET", path(api_version, kind, namespace, name))
    except ApiError as e:
        if e.status == 404:
            return None
        raise


def get_url(url: str) -> dict | None:
    """GET of an API path the kinds above do not name (e.g. a cluster-scoped object); None for a 404."""
    try:
        return _call("GET", url)
    except ApiError as e:
        if e.status == 404:
            return None
        raise


def list_(api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict]:
    return _call("GET", path(api_version, kind, namespace), query=[("labelSelector", label_selector)])["items"]


def patch_status(api_version: str, kind: str, namespace: str, name: str, status: dict) -> None:
    """A merge patch of the status subresource (a 404: the object is gone, nothing to say)."""
    try:
        url = path(api_version, kind, namespace, name) + "/status"
        _call("PATCH", url, {"status": status}, content_type="application/merge-patch+json")
    except ApiError as e:
        if e.status != 404:
            raise


def delete(api_version: str, kind: str, namespace: str, name: str) -> None:
    try:
        _call("DELETE", path(api_version, kind, namespace, name), {"propagationPolicy": "Background"})
    except ApiError as e:
        if e.status != 404:
            raise


def serves(api_version: str, kind: str) -> bool:
    """Whether API discovery lists the kind in that group-version (a CRD that is installed)."""
    try:
        resources = _call("GET", f"/apis/{api_version}")["resources"]
    except ApiError as e:
        if e.status in (404, 503):  # no such group-version (503: an aggregated API that is down)
            return False
        raise
    return any(r["kind"] == kind for r in resources)
