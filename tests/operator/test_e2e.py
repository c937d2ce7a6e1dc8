"""End to end: a real `kopf run` and a real kubectl against the emulated API server.

The emulator runs no controllers and no garbage collector: tests play the Deployment controller by
writing Deployment status, and check owner references where a cluster would garbage-collect.
"""

import itertools
import json

import pytest
from op_harness import NAMESPACE, Operator
from poll import until

_ids = itertools.count()


def isvc(spec: dict | None = None, name: str | None = None) -> dict:
    return {
        "apiVersion": "serving.nanoserve.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name or f"svc{next(_ids)}"},
        "spec": spec or {"device": "cpu"},
    }


@pytest.fixture
def name(kubectl, operator):
    """A fresh InferenceService name, deleted after the test so resyncs don't pile up."""
    name = f"svc{next(_ids)}"
    yield name
    kubectl("delete", "-n", NAMESPACE, f"isvc/{name}", "--ignore-not-found", "--wait=false")


def condition(obj: dict | None, type_: str) -> dict:
    return next((c for c in (obj or {}).get("status", {}).get("conditions", []) if c["type"] == type_), {})


def reconciled(kubectl, name: str, namespace: str = NAMESPACE) -> dict:
    """Waits until the operator has written status for the current generation."""

    def check():
        obj = kubectl.get("isvc", name, namespace)
        st = (obj or {}).get("status", {})
        return obj if st.get("observedGeneration") == obj["metadata"]["generation"] else None

    return until(check, what=f"status of {name}")


HPA = "horizontalpodautoscalers.v2.autoscaling"  # the version the operator writes (the emulator keeps each apart)


def children(kubectl, name: str, namespace: str = NAMESPACE) -> dict[tuple[str, str], dict]:
    sel = f"app.kubernetes.io/instance={name}"
    kinds = f"deployments,services,serviceaccounts,roles,rolebindings,poddisruptionbudgets,{HPA}"
    return {(o["kind"], o["metadata"]["name"]): o for o in kubectl.items(kinds, sel, namespace)}


def play_deployment_controller(kubectl, dep: dict, ready: int | None = None) -> None:
    """What the Deployment controller would write once its pods are up."""
    want = dep["spec"]["replicas"]
    status = {
        "observedGeneration": dep["metadata"]["generation"],
        "replicas": want,
        "updatedReplicas": want,
        "readyReplicas": want if ready is None else ready,
        "availableReplicas": want if ready is None else ready,
    }
    kubectl(
        "patch",
        "deployment",
        dep["metadata"]["name"],
        "-n",
        dep["metadata"]["namespace"],
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def test_create_makes_owned_children_and_status(kubectl, name):
    kubectl.apply(isvc(name=name))
    obj = reconciled(kubectl, name)
    kids = until(lambda: (k := children(kubectl, name)) and len(k) == 9 and k, what="9 children")
    kinds = {"Deployment", "Service", "ServiceAccount", "Role", "RoleBinding", "PodDisruptionBudget"}
    assert {kind for kind, _ in kids} == kinds
    for child in kids.values():
        (ref,) = child["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"]) == ("InferenceService", name, obj["metadata"]["uid"])
        assert ref["controller"] is True and ref["blockOwnerDeletion"] is True
    st = obj["status"]
    assert st["url"] == f"http://{name}.{NAMESPACE}.svc" and st["model"] == "smollm2-135m"
    # No Deployment controller here: nothing is ready, the rollout is in progress, nothing is broken.
    assert condition(obj, "Ready")["status"] == "False"
    assert condition(obj, "Progressing")["status"] == "True"
    assert condition(obj, "Degraded")["status"] == "False"


def test_ready_follows_the_deployments(kubectl, name):
    kubectl.apply(isvc(name=name))
    kids = until(lambda: (k := children(kubectl, name)) and len(k) == 9 and k, what="children")
    play_deployment_controller(kubectl, kids["Deployment", f"{name}-engine"])
    play_deployment_controller(kubectl, kids["Deployment", f"{name}-gateway"])
    kubectl("wait", "-n", NAMESPACE, f"isvc/{name}", "--for=condition=Ready", "--timeout=30s")
    obj = kubectl.get("isvc", name)
    assert obj["status"]["readyReplicas"] == 1
    assert condition(obj, "Progressing")["status"] == "False"

    play_deployment_controller(kubectl, kubectl.get("deployment", f"{name}-engine"), ready=0)  # a pod died
    until(lambda: condition(kubectl.get("isvc", name), "Ready").get("status") == "False", what="not Ready")


def test_kubectl_scale_patches_the_engine_deployment(kubectl, name):
    kubectl.apply(isvc(name=name))
    reconciled(kubectl, name)
    kubectl("scale", "-n", NAMESPACE, f"isvc/{name}", "--replicas=3")
    until(
        lambda: (kubectl.get("deployment", f"{name}-engine") or {}).get("spec", {}).get("replicas") == 3,
        what="engine replicas 3",
    )
    assert kubectl.get("isvc", name)["spec"]["replicas"] == 3


def test_image_change_rolls_the_engine(kubectl, name):
    kubectl.apply(isvc(name=name))
    reconciled(kubectl, name)
    before = kubectl.get("deployment", f"{name}-engine")
    kubectl("patch", "-n", NAMESPACE, f"isvc/{name}", "--type=merge", "-p", '{"spec": {"image": "engine:v2"}}')

    def rolled():
        dep = kubectl.get("deployment", f"{name}-engine")
        return dep if dep["spec"]["template"]["spec"]["containers"][0]["image"] == "engine:v2" else None

    after = until(rolled, what="new engine image")
    assert int(after["metadata"]["generation"]) > int(before["metadata"]["generation"])  # a new rollout
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # patched, not recreated


def test_children_deleted_or_edited_by_hand_are_restored(kubectl, name):
    kubectl.apply(isvc(name=name))
    reconciled(kubectl, name)
    engine = until(lambda: kubectl.get("deployment", f"{name}-engine"), what="engine")
    kubectl("delete", "-n", NAMESPACE, "deployment", f"{name}-engine")
    kubectl("delete", "-n", NAMESPACE, "service", name)
    back = until(lambda: kubectl.get("deployment", f"{name}-engine"), what="engine recreated")
    assert back["metadata"]["uid"] != engine["metadata"]["uid"]
    until(lambda: kubectl.get("service", name), what="gateway service recreated")

    kubectl("set", "image", "-n", NAMESPACE, f"deployment/{name}-engine", "engine=evil:latest")
    until(
        lambda: (
            kubectl.get("deployment", f"{name}-engine")["spec"]["template"]["spec"]["containers"][0]["image"]
            == engine["spec"]["template"]["spec"]["containers"][0]["image"]
        ),
        what="image restored",
    )


def test_disabling_the_gateway_removes_it(kubectl, name):
    kubectl.apply(isvc(name=name))
    until(lambda: kubectl.get("deployment", f"{name}-gateway"), what="gateway")
    kubectl("patch", "-n", NAMESPACE, f"isvc/{name}", "--type=merge", "-p", '{"spec": {"gateway": {"enabled": false}}}')
    until(lambda: kubectl.get("deployment", f"{name}-gateway") is None, what="gateway removed")
    obj = reconciled(kubectl, name)
    engine = {
        ("Deployment", f"{name}-engine"),
        ("Service", f"{name}-engine"),
        ("PodDisruptionBudget", f"{name}-engine"),
    }
    assert set(children(kubectl, name)) == engine
    assert f"{name}-engine" in obj["status"]["url"]


def test_autoscaling_adds_an_hpa_on_the_service_and_removing_it_deletes_it(kubectl, name):
    kubectl.apply(isvc({"autoscaling": {"maxReplicas": 3}}, name=name))
    hpa = until(lambda: kubectl.get(HPA, f"{name}-engine"), what="the HPA")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "serving.nanoserve.io/v1alpha1",
        "kind": "InferenceService",
        "name": name,
    }
    assert hpa["metadata"]["ownerReferences"][0]["name"] == name
    kubectl("patch", "-n", NAMESPACE, f"isvc/{name}", "--type=merge", "-p", '{"spec": {"autoscaling": null}}')
    until(lambda: kubectl.get(HPA, f"{name}-engine") is None, what="the HPA removed")


def test_a_network_policy_comes_and_goes_with_its_switch(kubectl, name):
    kubectl.apply(isvc({"networkPolicy": {"enabled": True}}, name=name))
    policy = until(lambda: kubectl.get("networkpolicy", f"{name}-engine"), what="the network policy")
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
        "gateway"
    )
    patch = '{"spec": {"networkPolicy": {"enabled": false}}}'
    kubectl("patch", "-n", NAMESPACE, f"isvc/{name}", "--type=merge", "-p", patch)
    until(lambda: kubectl.get("networkpolicy", f"{name}-engine") is None, what="the network policy removed")


INVALID = {
    "two model sources": ({"model": {"builtin": "smollm2-135m", "name": "Qwen/Qwen3-0.6B"}}, "exactly one"),
    "tp on cpu": ({"device": "cpu", "tensorParallelSize": 2}, "needs device gpu"),
    "tp 16": ({"tensorParallelSize": 16}, "spec.tensorParallelSize"),
}


@pytest.mark.parametrize("spec,needle", INVALID.values(), ids=INVALID.keys())
def test_invalid_specs_are_rejected_by_the_api(kubectl, spec, needle):
    manifest = isvc(spec)
    proc = kubectl.apply(manifest, check=False)
    assert proc.returncode != 0 and "is invalid" in proc.stderr and needle in proc.stderr, proc.stderr
    assert kubectl.get("isvc", manifest["metadata"]["name"]) is None


def test_missing_model_volume_is_degraded_until_it_appears(kubectl, name):
    kubectl.apply(isvc({"model": {"pvc": f"{name}-models", "path": "qwen3"}}, name=name))
    until(lambda: condition(kubectl.get("isvc", name), "Degraded").get("status") == "True", what="Degraded")
    obj = kubectl.get("isvc", name)
    assert condition(obj, "Degraded")["reason"] == "ModelVolumeMissing"
    assert f"{name}-models" in condition(obj, "Degraded")["message"]
    assert kubectl.get("deployment", f"{name}-engine") is not None  # pods wait for the claim, as in a cluster
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"{name}-models"},
            "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}},
        }
    )
    until(lambda: condition(kubectl.get("isvc", name), "Degraded").get("status") == "False", what="Degraded cleared")


def test_operator_restart_creates_no_duplicates(kubectl, cluster, tmp_path):
    ns, name = "restart", "survivor"
    op = Operator(cluster.env, ns, tmp_path / "kopf.log").start()
    try:
        kubectl.apply(isvc(name=name), namespace=ns)
        before = until(lambda: (k := children(kubectl, name, ns)) and len(k) == 9 and k, what="children")
    finally:
        op.stop()
    log_size = len((tmp_path / "kopf.log").read_text())
    op.start()
    try:
        # The new process resumes the object: its handler runs once more against the same children.
        until(lambda: "'on_change' succeeded" in (tmp_path / "kopf.log").read_text()[log_size:], what="resume handler")
        after = children(kubectl, name, ns)
    finally:
        op.stop()
    assert set(after) == set(before)
    assert {k: v["metadata"]["uid"] for k, v in after.items()} == {k: v["metadata"]["uid"] for k, v in before.items()}


def test_an_inference_service_deletes_while_the_operator_is_down(kubectl, cluster, tmp_path):
    """No finalizer: deleting never waits for the operator (its children go by their owner references)."""
    ns, name = "downtime", "orphan"
    op = Operator(cluster.env, ns, tmp_path / "kopf.log").start()
    try:
        kubectl.apply(isvc(name=name), namespace=ns)
        obj = reconciled(kubectl, name, ns)
        until(lambda: kubectl.get("deployment", f"{name}-engine", ns), what="children")
    finally:
        op.stop()
    assert not obj["metadata"].get("finalizers")
    kubectl("delete", "-n", ns, f"isvc/{name}", "--wait=false")
    until(lambda: kubectl.get("isvc", name, ns) is None, what=f"{name} deleted with no operator running")


def test_deleting_the_service_stops_reconciling_it(kubectl, name):
    kubectl.apply(isvc(name=name))
    reconciled(kubectl, name)
    kubectl("delete", "-n", NAMESPACE, f"isvc/{name}", "--wait=false")
    until(lambda: kubectl.get("isvc", name) is None, what=f"{name} deleted")
    # No garbage collector here; in a cluster the owner references (checked above) remove the children.
    # What the operator must not do is fight that: a child deleted now stays deleted.
    kubectl("delete", "-n", NAMESPACE, "deployment", f"{name}-engine")
    kubectl.apply(isvc(name=f"{name}-probe"))  # a later reconcile proves the operator kept running
    reconciled(kubectl, f"{name}-probe")
    until(lambda: kubectl.get("deployment", f"{name}-probe-engine"), what="probe children")
    assert kubectl.get("deployment", f"{name}-engine") is None
    kubectl("delete", "-n", NAMESPACE, f"isvc/{name}-probe", "--wait=false")
