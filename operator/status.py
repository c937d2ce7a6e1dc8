"""Pure status: conditions and counts of an InferenceService from its Deployments' status."""

import datetime

from nanoserve.operator.model import model_summary
from nanoserve.operator.names import selector_string
from nanoserve.operator.render import service_url


def _rollout(dep: dict | None, want: int) -> tuple[bool, bool, str]:
    """(ready, progressing, why) for one Deployment that should have `want` ready replicas."""
    if dep is None:
        return False, True, "not created yet"
    st, gen = dep.get("status", {}), dep.get("metadata", {}).get("generation", 0)
    name = dep["metadata"]["name"]
    if st.get("observedGeneration", 0) < gen:
        return False, True, f"{name}: rollout not observed yet"
    ready, updated = st.get("readyReplicas", 0), st.get("updatedReplicas", 0)
    if updated < want or st.get("replicas", 0) > want:
        return ready >= want, True, f"{name}: {updated}/{want} updated"
    if ready < want:
        return False, True, f"{name}: {ready}/{want} ready"
    return True, False, f"{name}: {ready}/{want} ready"


def _failures(dep: dict | None) -> list[tuple[str, str]]:
    """The Deployment controller's own verdicts that no waiting will fix."""
    if dep is None:
        return []
    out = []
    for c in dep.get("status", {}).get("conditions", []):
        failed = c.get("type") == "ReplicaFailure" and c.get("status") == "True"
        stuck = c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
        if failed or stuck:
            out.append((c.get("reason", c["type"]), f"{dep['metadata']['name']}: {c.get('message', '')}"))
    return out


def _condition(old: list[dict], type_: str, ok: bool, reason: str, message: str, gen: int, now: str) -> dict:
    status = "True" if ok else "False"
    prev = next((c for c in old if c.get("type") == type_), None)
    # lastTransitionTime only moves when the status flips, as in every built-in controller.
    since = (
        prev["lastTransitionTime"] if prev and prev.get("status") == status and "lastTransitionTime" in prev else now
    )
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": gen,
        "lastTransitionTime": since,
    }


def _now(now: datetime.datetime | None) -> str:
    return (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def invalid_status(generation: int, old_status: dict, message: str, now: datetime.datetime | None = None) -> dict:
    """For a spec that cannot be rendered at all: report it, keep whatever runs untouched."""
    old, t = old_status.get("conditions", []), _now(now)
    return {
        **old_status,
        "observedGeneration": generation,
        "conditions": [
            _condition(old, "Ready", False, "InvalidSpec", message, generation, t),
            _condition(old, "Progressing", False, "InvalidSpec", message, generation, t),
            _condition(old, "Degraded", True, "InvalidSpec", message, generation, t),
        ],
    }


def compute_status(
    name: str,
    namespace: str,
    spec: dict,
    generation: int,
    old_status: dict,
    engine: dict | None,
    gateway: dict | None,
    problems: list[tuple[str, str]],
    now: datetime.datetime | None = None,
    pod_failures: list[tuple[str, str]] | None = None,
) -> dict:
    """problems: (reason, message) pairs the operator itself found (missing PVC, rejected manifests).
    pod_failures: what failed in some pods (a model download): Degraded, while the Deployments say Ready."""
    now_s = _now(now)
    old = old_status.get("conditions", [])
    e_ready, e_prog, e_why = _rollout(engine, spec["replicas"])
    g_ready, g_prog, g_why = (
        (True, False, "") if not spec["gateway"]["enabled"] else _rollout(gateway, spec["gateway"]["replicas"])
    )
    failures = problems + (pod_failures or []) + _failures(engine) + _failures(gateway)
    ready = e_ready and g_ready and not problems
    progressing = (e_prog or g_prog) and not failures
    why = "; ".join(w for w in (e_why, g_why) if w)
    conditions = [
        _condition(old, "Ready", ready, "Available" if ready else "NotReady", why, generation, now_s),
        _condition(old, "Progressing", progressing, "RollingOut" if progressing else "Settled", why, generation, now_s),
        _condition(
            old,
            "Degraded",
            bool(failures),
            failures[0][0] if failures else "AsExpected",
            "; ".join(m for _, m in failures),
            generation,
            now_s,
        ),
    ]
    return {
        "observedGeneration": generation,
        "replicas": (engine or {}).get("status", {}).get("replicas", 0),
        "readyReplicas": (engine or {}).get("status", {}).get("readyReplicas", 0),
        "selector": selector_string(name, "engine"),
        "url": service_url(name, namespace, spec),
        "model": model_summary(spec["model"]),
        "conditions": conditions,
    }
