"""spec.modelCache: a PVC that downloaded models land in once and every later pod reuses, either an existing
claim or one the operator creates (and owns: it goes with the InferenceService)."""

from nanoserve.operator.names import labels


def cache_claim(name: str, spec: dict) -> str | None:
    """The cache's claim name, or None without a cache (each pod downloads into its own emptyDir)."""
    if not spec.get("modelCache"):
        return None
    return given_claim(spec) or cache_pvc_name(name)


def given_claim(spec: dict) -> str | None:
    """modelCache.claimName: a claim the user made (one the operator creates is applied, not looked up)."""
    return (spec.get("modelCache") or {}).get("claimName")


def cache_pvc_name(name: str) -> str:
    return f"{name}-model-cache"


def render_cache_pvc(name: str, spec: dict) -> dict | None:
    """The claim for modelCache.create. ReadWriteMany lets pods on every node share it; ReadWriteOnce holds
    one node's pods (a cheaper disk, for one replica or pods pinned to one node)."""
    cache = spec.get("modelCache") or {}
    if not cache.get("create"):
        return None
    pvc_spec: dict = {
        "accessModes": [cache.get("accessMode", "ReadWriteMany")],
        "resources": {"requests": {"storage": str(cache["size"])}},
    }
    if cache.get("storageClassName"):
        pvc_spec["storageClassName"] = cache["storageClassName"]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": cache_pvc_name(name), "labels": labels(name, "model-cache")},
        "spec": pvc_spec,
    }
