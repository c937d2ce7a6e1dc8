"""Pure status: conditions follow the Deployments' rollout and the operator's own findings."""

import datetime

from crd_schema import default_spec

from nanoserve.operator.status import compute_status, invalid_status

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)


def dep(
    name: str,
    want: int,
    ready: int,
    *,
    generation: int = 2,
    observed: int = 2,
    updated: int | None = None,
    conditions: list | None = None,
) -> dict:
    """A Deployment as the Deployment controller leaves it."""
    return {
        "metadata": {"name": name, "generation": generation},
        "status": {
            "observedGeneration": observed,
            "replicas": want,
            "readyReplicas": ready,
            "updatedReplicas": want if updated is None else updated,
            "conditions": conditions or [],
        },
    }


def status(spec=None, engine=None, gateway=None, problems=(), old=None, now=T0):
    full = default_spec(spec or {})
    return compute_status("demo", "ml", full, 7, old or {}, engine, gateway, list(problems), now=now)


def conds(st: dict) -> dict[str, dict]:
    return {c["type"]: c for c in st["conditions"]}


def test_nothing_running_yet_is_progressing_not_ready():
    c = conds(status())
    assert c["Ready"]["status"] == "False" and c["Progressing"]["status"] == "True"
    assert c["Degraded"]["status"] == "False"


def test_all_rolled_out_is_ready():
    st = status({"replicas": 3}, dep("demo-engine", 3, 3), dep("demo-gateway", 1, 1))
    c = conds(st)
    assert (c["Ready"]["status"], c["Progressing"]["status"], c["Degraded"]["status"]) == ("True", "False", "False")
    assert st["readyReplicas"] == 3 and st["replicas"] == 3 and st["observedGeneration"] == 7
    assert all(x["observedGeneration"] == 7 for x in st["conditions"])
    assert st["url"].startswith("http://demo.ml.svc")
    assert "app.kubernetes.io/instance=demo" in st["selector"].split(",")


def test_ready_needs_the_gateway_too_unless_disabled():
    assert conds(status({}, dep("demo-engine", 1, 1), dep("demo-gateway", 1, 0)))["Ready"]["status"] == "False"
    assert conds(status({"gateway": {"enabled": False}}, dep("demo-engine", 1, 1)))["Ready"]["status"] == "True"


def test_unobserved_generation_and_partial_rollouts_progress():
    stale = dep("demo-engine", 2, 2, generation=3, observed=2)
    assert conds(status({"replicas": 2}, stale, dep("demo-gateway", 1, 1)))["Progressing"]["status"] == "True"
    half = dep("demo-engine", 2, 2, updated=1)
    c = conds(status({"replicas": 2}, half, dep("demo-gateway", 1, 1)))
    assert c["Progressing"]["status"] == "True" and "1/2" in c["Progressing"]["message"]


def test_operator_problems_degrade():
    c = conds(
        status(
            {},
            dep("demo-engine", 1, 1),
            dep("demo-gateway", 1, 1),
            problems=[("ModelVolumeMissing", "PersistentVolumeClaim 'm' not found")],
        )
    )
    assert c["Degraded"]["status"] == "True" and c["Degraded"]["reason"] == "ModelVolumeMissing"
    assert "'m'" in c["Degraded"]["message"] and c["Ready"]["status"] == "False"


def test_deployment_failures_degrade_and_stop_progressing():
    stuck = dep(
        "demo-engine",
        1,
        0,
        conditions=[
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "too slow"}
        ],
    )
    c = conds(status({}, stuck, dep("demo-gateway", 1, 1)))
    assert c["Degraded"]["status"] == "True" and "too slow" in c["Degraded"]["message"]
    assert c["Progressing"]["status"] == "False"


def test_transition_time_moves_only_when_the_status_flips():
    first = status()
    same = status(old=first, now=T1)
    assert conds(same)["Ready"]["lastTransitionTime"] == conds(first)["Ready"]["lastTransitionTime"]
    flipped = status({}, dep("demo-engine", 1, 1), dep("demo-gateway", 1, 1), old=first, now=T1)
    assert conds(flipped)["Ready"]["lastTransitionTime"] != conds(first)["Ready"]["lastTransitionTime"]
    assert conds(flipped)["Degraded"]["lastTransitionTime"] == conds(first)["Degraded"]["lastTransitionTime"]


def test_invalid_spec_keeps_counts_and_degrades():
    ok = status({}, dep("demo-engine", 1, 1), dep("demo-gateway", 1, 1))
    bad = invalid_status(8, ok, "cannot render children: KeyError('model')")
    assert conds(bad)["Degraded"]["status"] == "True" and "KeyError" in conds(bad)["Degraded"]["message"]
    assert bad["readyReplicas"] == ok["readyReplicas"] and bad["observedGeneration"] == 8
