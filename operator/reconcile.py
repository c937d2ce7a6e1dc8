"""One idempotent reconcile for create, update, resume and resync: render, apply, read back status."""

import logging

import kopf

from nanoserve.operator import keda as keda_api
from nanoserve.operator import kube
from nanoserve.operator.model_cache import given_claim
from nanoserve.operator.model_status import model_load, status_patch
from nanoserve.operator.names import engine_name, gateway_name, selector_string
from nanoserve.operator.render import render, render_stale
from nanoserve.operator.status import compute_status, invalid_status

log = logging.getLogger(__name__)


def preflight(namespace: str, spec: dict) -> list[tuple[str, str]]:
    """What the CRD schema cannot check: references to objects that must already exist."""
    problems = []
    claims = [("ModelVolumeMissing", spec["model"].get("pvc")), ("ModelCacheMissing", given_claim(spec))]
    for reason, pvc in claims:
        if pvc and kube.get("v1", "PersistentVolumeClaim", namespace, pvc) is None:
            problems.append((reason, f"PersistentVolumeClaim {pvc!r} not found in {namespace}"))
    return problems


def apply_all(objs: list[dict], namespace: str) -> list[tuple[str, str]]:
    """Apply each child; a rejection (4xx) is a problem to report, anything else is retried by kopf."""
    problems = []
    for obj in objs:
        try:
            kube.apply(obj, namespace)
        except kube.ApiError as e:
            if e.status in (400, 403, 422):
                problems.append(("Rejected", f"{obj['kind']} {obj['metadata']['name']}: {e}"))
            else:
                raise
    return problems


def reconcile(owner: kopf.Body, name: str, namespace: str, spec: dict, generation: int, old_status: dict) -> dict:
    """Returns the new status; raises only on transient API failures (kopf retries those)."""
    # Discovery only when it matters: whether the autoscaler is KEDA's or an HPA.
    keda = bool(spec.get("autoscaling")) and kube.serves(keda_api.API_VERSION, "ScaledObject")
    try:
        objs, stale = render(name, namespace, spec, keda), render_stale(name, namespace, spec, keda)
    except (KeyError, TypeError, ValueError) as e:  # a spec the schema let through but we can't serve
        log.warning("cannot render %s/%s: %r", namespace, name, e)
        return invalid_status(generation, old_status, f"cannot render children: {e!r}")
    problems = preflight(namespace, spec)
    kopf.adopt(objs, owner=owner)  # owner references: deleting the InferenceService deletes these
    problems += apply_all(objs, namespace)
    for obj in stale:
        kube.delete(obj["apiVersion"], obj["kind"], namespace, obj["metadata"]["name"])
    engine = kube.get("apps/v1", "Deployment", namespace, engine_name(name))
    gateway = kube.get("apps/v1", "Deployment", namespace, gateway_name(name)) if spec["gateway"]["enabled"] else None
    load, failed = model_load(spec["model"], kube.list_("v1", "Pod", namespace, selector_string(name, "engine")))
    status = compute_status(
        name, namespace, spec, generation, old_status, engine, gateway, problems, pod_failures=failed
    )
    return status | status_patch(load)
