"""`helm install` (helm-sdkpy) into the emulated API server, then the operator as the chart runs it."""

import json

import pytest
from chart_install import RELEASE, RELEASE_NS, example
from rbac_rules import Call

from nanoserve.operator.names import MANAGER


def test_release_is_deployed_with_notes(installed):
    info = installed.release["info"]
    assert info["status"] == "deployed"
    assert "kubectl apply" in info["notes"] and "port-forward" in info["notes"]


def test_crd_is_installed_and_established(installed):
    crd = json.loads(installed.kubectl("get", "crd", "inferenceservices.serving.nanoserve.io", "-o", "json").stdout)
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"


def test_operator_runs_with_the_charts_settings(installed):
    assert installed.deployment["metadata"]["namespace"] == RELEASE_NS
    (c,) = installed.deployment["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e.get("value") for e in c["env"]}["NANOSERVE_RESYNC_SECONDS"] == "1"  # from the values


def test_operator_peers_through_the_releases_peering_object(installed):
    # kopf's keep-alives went to the peering object helm installed (a paused operator would have handled
    # nothing: installed_chart waited for every InferenceService): cluster-wide one, or one per namespace.
    (c,) = installed.deployment["spec"]["template"]["spec"]["containers"]
    namespaces = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--namespace=")]
    wanted = (
        {Call("patch", "kopf.dev", "kopfpeerings", ns, RELEASE) for ns in namespaces}
        if namespaces
        else {Call("patch", "kopf.dev", "clusterkopfpeerings", None, RELEASE)}
    )
    assert wanted <= set(installed.operator_calls)
    assert f"--peering={RELEASE}" in c["args"]
    kind = "kopfpeerings" if namespaces else "clusterkopfpeerings"
    for ns in namespaces or [None]:
        obj = installed.kubectl.get(kind, RELEASE, ns or "default")  # (-n means nothing to a cluster-scoped kind)
        assert obj is not None and obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert obj["status"] == {}  # it said goodbye as it stopped (SIGTERM): its entry is gone


def test_example_is_reconciled_into_owned_children(installed):
    kubectl, name = installed.kubectl, example()["metadata"]["name"]
    obj = kubectl.get("isvc", name, "ml")
    assert obj["status"]["url"] == f"http://{name}.ml.svc"
    kids = kubectl.items("deployments,services", f"app.kubernetes.io/instance={name}", "ml")
    assert {(k["kind"], k["metadata"]["name"]) for k in kids} == {
        ("Deployment", f"{name}-engine"),
        ("Deployment", f"{name}-gateway"),
        ("Service", f"{name}-engine"),
        ("Service", name),
    }
    for kid in kids:
        assert kid["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
        assert kid["metadata"]["labels"]["app.kubernetes.io/managed-by"] == MANAGER


def test_missing_model_volume_is_degraded(installed):
    obj = installed.kubectl.get("isvc", "no-pvc", "ml")
    degraded = next(c for c in obj["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and "absent" in degraded["message"]


def test_namespaced_operator_leaves_other_namespaces_alone(installed):
    obj = installed.kubectl.get("isvc", "ignored", "other")
    if obj is None:
        pytest.skip("cluster-wide mode has no unserved namespace")
    assert "status" not in obj
    assert not any(c.namespace == "other" for c in installed.operator_calls)
