"""End to end (a real `kopf run`, the emulated API server, test_e2e.py's pattern): the model cache's claim,
and status.modelLoad from engine pods whose status the test writes, as the kubelet would."""

import itertools
import json

import pytest
from op_harness import NAMESPACE
from poll import until
from test_e2e import condition, isvc, reconciled

_ids = itertools.count()

S3 = {"bucket": "models", "path": "qwen3/tiny", "endpoint": "http://minio.storage:9000"}
REPORT = {"source": "s3://models/qwen3/tiny", "downloaded": True, "bytes": 4137, "seconds": 1.5}


@pytest.fixture
def name(kubectl, operator):
    """A fresh InferenceService name (not test_e2e's), deleted after the test so resyncs don't pile up."""
    name = f"cache{next(_ids)}"
    yield name
    kubectl("delete", "-n", NAMESPACE, f"isvc/{name}", "--ignore-not-found", "--wait=false")


def test_a_created_cache_is_an_owned_claim_the_engines_mount(kubectl, name):
    cache = {"create": True, "size": "2Gi", "accessMode": "ReadWriteOnce"}
    kubectl.apply(isvc({"device": "cpu", "model": {"s3": S3}, "modelCache": cache}, name=name))
    obj = reconciled(kubectl, name)
    pvc = until(lambda: kubectl.get("persistentvolumeclaim", f"{name}-model-cache"), what="the cache's claim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"] and pvc["spec"]["resources"]["requests"] == {
        "storage": "2Gi"
    }
    (ref,) = pvc["metadata"]["ownerReferences"]  # it goes with the InferenceService, as the other children
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
        "InferenceService",
        name,
        obj["metadata"]["uid"],
        True,
    )
    pod = kubectl.get("deployment", f"{name}-engine")["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "model"]
    assert vol["persistentVolumeClaim"]["claimName"] == f"{name}-model-cache"
    assert {m["name"] for m in pod["initContainers"][0]["volumeMounts"]} >= {"model"}

    # Deleted: no garbage collector here (in a cluster the owner reference removes the claim); the operator
    # must not bring it back.
    kubectl("delete", "-n", NAMESPACE, f"isvc/{name}", "--wait=false")
    until(lambda: kubectl.get("isvc", name) is None, what=f"{name} deleted")
    kubectl("delete", "-n", NAMESPACE, "persistentvolumeclaim", f"{name}-model-cache")
    kubectl.apply(isvc(name=f"{name}-probe"))  # a later reconcile proves the operator kept running
    reconciled(kubectl, f"{name}-probe")
    assert kubectl.get("persistentvolumeclaim", f"{name}-model-cache") is None
    kubectl("delete", "-n", NAMESPACE, f"isvc/{name}-probe", "--wait=false")


def test_a_missing_cache_claim_is_degraded_until_it_appears(kubectl, name):
    kubectl.apply(isvc({"device": "cpu", "model": {"s3": S3}, "modelCache": {"claimName": f"{name}-c"}}, name=name))
    until(lambda: condition(kubectl.get("isvc", name), "Degraded").get("reason") == "ModelCacheMissing", "Degraded")
    claim = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}
    kubectl.apply(
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": f"{name}-c"}, "spec": claim}
    )
    until(lambda: condition(kubectl.get("isvc", name), "Degraded").get("status") == "False", what="Degraded cleared")


def engine_pod(kubectl, isvc_name: str, pod_name: str, init_status: dict) -> None:
    """An engine pod and the status its kubelet would write for it."""
    labels = {"app.kubernetes.io/instance": isvc_name, "app.kubernetes.io/component": "engine"}
    spec = {"containers": [{"name": "engine", "image": "engine"}]}
    kubectl.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name, "labels": labels}, "spec": spec})
    status = {
        "initContainerStatuses": [{"name": "download-model", **init_status}],
        "containerStatuses": [{"name": "engine", "state": {"running": {"startedAt": "2026-12-02T10:00:05Z"}}}],
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-02T10:00:45Z"}],
    }
    patch = ["--subresource=status", "--type=merge", "-p", json.dumps({"status": status})]
    kubectl("patch", "pod", pod_name, "-n", NAMESPACE, *patch)


def test_the_status_says_where_the_model_came_from_and_how_long_it_took(kubectl, name):
    kubectl.apply(isvc({"device": "cpu", "model": {"s3": S3}}, name=name))
    reconciled(kubectl, name)
    done = {"exitCode": 0, "message": json.dumps(REPORT), "finishedAt": "2026-12-02T10:00:04Z"}
    engine_pod(kubectl, name, f"{name}-engine-a", {"state": {"terminated": done}})
    load = until(lambda: kubectl.get("isvc", name)["status"].get("modelLoad"), what="status.modelLoad")
    assert load == {
        "pod": f"{name}-engine-a",
        "source": "s3://models/qwen3/tiny",
        "downloaded": True,
        "bytes": 4137,
        "downloadSeconds": 1.5,
        "readySeconds": 40,
    }
    failed = {"exitCode": 1, "message": "model download failed: S3Error: s3://models/qwen3/tiny/: NoSuchBucket"}
    engine_pod(kubectl, name, f"{name}-engine-b", {"state": {"waiting": {}}, "lastState": {"terminated": failed}})
    until(lambda: condition(kubectl.get("isvc", name), "Degraded").get("reason") == "ModelDownloadFailed", "Degraded")
    assert "NoSuchBucket" in condition(kubectl.get("isvc", name), "Degraded")["message"]
    for p in ("a", "b"):
        kubectl("delete", "-n", NAMESPACE, "pod", f"{name}-engine-{p}", "--wait=false")
