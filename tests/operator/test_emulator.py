"""Each fix the emulator makes to kmock 0.8, checked over plain HTTP as any client would see it."""

import json
import pathlib
import urllib.error
import urllib.request

import pytest
import yaml
from kube_emulator import matches_selector

NS = "emu"
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"
ISVCS = f"/apis/serving.nanoserve.io/v1alpha1/namespaces/{NS}/inferenceservices"


@pytest.fixture(scope="module")
def api(cluster):
    def call(method: str, path: str, body=None, content_type: str = "application/json"):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(
            cluster.url + path, data=data, method=method, headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    return call


def deployment(name: str, labels: dict | None = None, **spec) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"replicas": 1, **spec},
    }


def test_namespaces_are_objects(api):
    assert api("POST", "/api/v1/namespaces", {"metadata": {"name": "emu-ns"}})[0] == 201
    status, ns = api("GET", "/api/v1/namespaces/emu-ns")
    assert status == 200 and ns["metadata"]["name"] == "emu-ns"
    status, listing = api("GET", "/api/v1/namespaces")
    assert status == 200 and "emu-ns" in {n["metadata"]["name"] for n in listing["items"]}


def test_server_owned_metadata(api):
    status, created = api("POST", DEPLOYMENTS, deployment("meta"))
    meta = created["metadata"]
    assert status == 201 and meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    _, scaled = api("PATCH", f"{DEPLOYMENTS}/meta", {"spec": {"replicas": 2}}, "application/merge-patch+json")
    assert scaled["metadata"]["generation"] == 2
    assert int(scaled["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert scaled["metadata"]["uid"] == meta["uid"]
    _, labelled = api(
        "PATCH", f"{DEPLOYMENTS}/meta", {"metadata": {"labels": {"a": "b"}}}, "application/merge-patch+json"
    )
    assert labelled["metadata"]["generation"] == 2  # metadata is not spec
    assert labelled["metadata"]["resourceVersion"] != scaled["metadata"]["resourceVersion"]
    _, same = api("PATCH", f"{DEPLOYMENTS}/meta", {"metadata": {"labels": {"a": "b"}}}, "application/merge-patch+json")
    assert same["metadata"]["resourceVersion"] == labelled["metadata"]["resourceVersion"]  # no-op


def test_lists_name_their_kind(api):
    api("POST", DEPLOYMENTS, deployment("listed"))
    status, listing = api("GET", DEPLOYMENTS)
    assert status == 200 and (listing["kind"], listing["apiVersion"]) == ("DeploymentList", "apps/v1")
    assert int(listing["metadata"]["resourceVersion"]) > 0


def test_core_discovery(api):
    status, doc = api("GET", "/api/v1")
    assert status == 200 and doc["groupVersion"] == "v1"
    sub = [r for r in doc["resources"] if "/" in r["name"]]
    assert sub and all(r["shortNames"] == [] for r in sub)


def test_standard_error_reasons(api):
    status, err = api("GET", f"{DEPLOYMENTS}/nope")
    assert (status, err["reason"], err["kind"]) == (404, "NotFound", "Status")
    api("POST", DEPLOYMENTS, deployment("twice"))
    status, err = api("POST", DEPLOYMENTS, deployment("twice"))
    assert (status, err["reason"]) == (409, "AlreadyExists")
    status, err = api("POST", DEPLOYMENTS, b"\x0a\x02k8s", "application/vnd.kubernetes.protobuf")
    assert status == 415


def test_a_created_crd_is_served_and_enforced(api):
    status, doc = api("GET", "/apis/serving.nanoserve.io/v1alpha1")
    found = {r["name"]: r for r in doc["resources"]}
    assert status == 200 and found["inferenceservices"]["kind"] == "InferenceService"
    assert found["inferenceservices"]["namespaced"] is True and "isvc" in found["inferenceservices"]["shortNames"]
    assert {"inferenceservices/status", "inferenceservices/scale"} <= set(found)
    bad = {
        "apiVersion": "serving.nanoserve.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "bad"},
        "spec": {"tensorParallelSize": 2, "device": "cpu"},
    }
    status, err = api("POST", ISVCS, bad)
    assert (status, err["reason"]) == (422, "Invalid")
    assert err["details"]["causes"][0]["field"] == "spec" and "needs device gpu" in err["message"]
    status, ok = api("POST", ISVCS, {**bad, "spec": {}})
    assert status == 201 and ok["spec"]["replicas"] == 1 and ok["spec"]["model"] == {"builtin": "smollm2-135m"}


def test_server_side_apply_creates_and_put_replaces(api):
    apply = "application/apply-patch+yaml"
    status, created = api(
        "PATCH", f"{DEPLOYMENTS}/applied?fieldManager=t&force=true", deployment("applied", paused=True), apply
    )
    assert status == 201 and created["spec"]["paused"] is True
    status, again = api(
        "PATCH", f"{DEPLOYMENTS}/applied?fieldManager=t&force=true", deployment("applied", paused=True), apply
    )
    assert status == 200 and again["metadata"]["uid"] == created["metadata"]["uid"]
    assert api("PATCH", f"{DEPLOYMENTS}/ghost", {"spec": {}}, "application/merge-patch+json")[0] == 404
    status, replaced = api("PUT", f"{DEPLOYMENTS}/applied", deployment("applied"))
    assert status == 200 and "paused" not in replaced["spec"]
    assert api("PUT", f"{DEPLOYMENTS}/ghost", deployment("ghost"))[0] == 404


def test_strategic_merge_directives_are_not_stored(api):
    api("POST", DEPLOYMENTS, deployment("smp"))
    patch = {"spec": {"$setElementOrder/containers": [{"name": "a"}], "replicas": 4}}
    _, obj = api("PATCH", f"{DEPLOYMENTS}/smp", patch, "application/strategic-merge-patch+json")
    assert obj["spec"]["replicas"] == 4 and not any(k.startswith("$") for k in obj["spec"])


def test_status_and_scale_subresources(api):
    api("POST", DEPLOYMENTS, deployment("sub"))
    merge = "application/merge-patch+json"
    _, obj = api("PATCH", f"{DEPLOYMENTS}/sub", {"status": {"replicas": 9}}, merge)
    assert "status" not in obj  # the main resource ignores status
    _, obj = api("PATCH", f"{DEPLOYMENTS}/sub/status", {"status": {"replicas": 9}, "spec": {"replicas": 5}}, merge)
    assert obj["status"]["replicas"] == 9 and obj["spec"]["replicas"] == 1  # /status ignores the rest
    status, scale = api("GET", f"{DEPLOYMENTS}/sub/scale")
    assert status == 200 and scale["kind"] == "Scale" and scale["spec"]["replicas"] == 1
    _, scale = api("PATCH", f"{DEPLOYMENTS}/sub/scale", {"spec": {"replicas": 3}}, merge)
    assert scale["kind"] == "Scale" and api("GET", f"{DEPLOYMENTS}/sub")[1]["spec"]["replicas"] == 3


def test_label_and_field_selectors_filter_lists(api):
    api("POST", DEPLOYMENTS, deployment("sel-a", {"tier": "gpu", "team": "x"}))
    api("POST", DEPLOYMENTS, deployment("sel-b", {"tier": "cpu"}))
    names = lambda q: {d["metadata"]["name"] for d in api("GET", f"{DEPLOYMENTS}?{q}")[1]["items"]}  # noqa: E731
    assert names("labelSelector=tier%3Dgpu") == {"sel-a"}
    assert "sel-a" not in names("labelSelector=tier!%3Dgpu") and "sel-b" in names("labelSelector=tier!%3Dgpu")
    assert names("labelSelector=team,tier") == {"sel-a"}
    assert names("fieldSelector=metadata.name%3Dsel-b") == {"sel-b"}


@pytest.mark.parametrize(
    "selector,labels,expected",
    [
        ("a=1", {"a": "1"}, True),
        ("a==1", {"a": "2"}, False),
        ("a!=1", {}, True),
        ("a", {"b": "1"}, False),
        ("!a", {"b": "1"}, True),
        ("a=1,b=2", {"a": "1", "b": "2"}, True),
        ("a=1,b=2", {"a": "1"}, False),
        ("", {"x": "y"}, True),
    ],
)
def test_selector_grammar(selector, labels, expected):
    assert matches_selector(labels, selector) is expected


def test_watch_streams_json_filtered_with_an_initial_bookmark(api, cluster):
    api("POST", DEPLOYMENTS, deployment("w-old", {"app": "w"}))
    url = f"{cluster.url}{DEPLOYMENTS}?watch=true&sendInitialEvents=true&labelSelector=app%3Dw"
    with urllib.request.urlopen(url, timeout=10) as stream:
        assert stream.headers["Content-Type"].startswith("application/json")
        first, bookmark = json.loads(stream.readline()), json.loads(stream.readline())
        assert (first["type"], first["object"]["metadata"]["name"]) == ("ADDED", "w-old")
        assert bookmark["type"] == "BOOKMARK"
        assert bookmark["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"] == "true"
        api("POST", DEPLOYMENTS, deployment("w-other", {"app": "other"}))
        api("POST", DEPLOYMENTS, deployment("w-new", {"app": "w"}))
        event = json.loads(stream.readline())
        assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "w-new")


def test_removing_the_last_finalizer_completes_a_deletion(api):
    dep = deployment("fin")
    dep["metadata"]["finalizers"] = ["example.com/hold"]
    api("POST", DEPLOYMENTS, dep)
    assert api("DELETE", f"{DEPLOYMENTS}/fin")[0] == 200
    status, held = api("GET", f"{DEPLOYMENTS}/fin")
    assert status == 200 and held["metadata"]["deletionTimestamp"]
    api("PATCH", f"{DEPLOYMENTS}/fin", {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    assert api("GET", f"{DEPLOYMENTS}/fin")[0] == 404


def test_a_watch_from_a_resource_version_replays_what_happened_since(api, cluster):
    _, obj = api("POST", DEPLOYMENTS, deployment("gone"))
    api("DELETE", f"{DEPLOYMENTS}/gone")  # happens between a client's GET and its watch
    url = (
        f"{cluster.url}{DEPLOYMENTS}?watch=true&fieldSelector=metadata.name%3Dgone"
        f"&resourceVersion={obj['metadata']['resourceVersion']}"
    )
    with urllib.request.urlopen(url, timeout=10) as stream:
        event = json.loads(stream.readline())
    assert (event["type"], event["object"]["metadata"]["name"]) == ("DELETED", "gone")
    assert int(event["object"]["metadata"]["resourceVersion"]) > int(obj["metadata"]["resourceVersion"])


def test_a_json_patch_whose_test_fails_is_unprocessable(api):
    _, dep = api("POST", DEPLOYMENTS, deployment("jp"))
    api("PATCH", f"{DEPLOYMENTS}/jp", {"metadata": {"labels": {"a": "b"}}}, "application/merge-patch+json")
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": dep["metadata"]["resourceVersion"]},
        {"op": "add", "path": "/metadata/finalizers", "value": ["example.com/hold"]},
    ]
    status, err = api("PATCH", f"{DEPLOYMENTS}/jp", ops, "application/json-patch+json")
    assert (status, err["reason"]) == (422, "Invalid")  # kopf retries a 422 on its next cycle, a 500 for a minute
    assert "finalizers" not in api("GET", f"{DEPLOYMENTS}/jp")[1]["metadata"]


PEERING_CRDS = pathlib.Path(__file__).parents[2] / "crds" / "kopfpeering.yaml"


def test_kopf_peering_objects_keep_alives_in_their_status(api, cluster):
    # What kopf's peering does (kopf/_core/engines/peering.py): merge patches of the status of a custom
    # resource that has no status subresource, a null removing a peer, watched by the other peers.
    for crd in yaml.safe_load_all(PEERING_CRDS.read_text()):
        url = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"
        assert api("PATCH", f"{url}?fieldManager=t&force=true", crd, "application/apply-patch+yaml")[0] in (200, 201)
    peerings = "/apis/kopf.dev/v1/clusterkopfpeerings"
    status, created = api("POST", peerings, {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                                            "metadata": {"name": "emu"}})  # fmt: skip
    assert status == 201 and "namespace" not in created["metadata"]  # cluster-scoped
    merge = "application/merge-patch+json"
    url = f"{cluster.url}{peerings}?watch=true&resourceVersion={created['metadata']['resourceVersion']}"
    with urllib.request.urlopen(url, timeout=10) as stream:
        peer = {"priority": -5, "lifetime": 60, "lastseen": "2026-01-01T00:00:00+00:00"}
        _, a = api("PATCH", f"{peerings}/emu", {"status": {"a": peer, "b": {**peer, "priority": -6}}}, merge)
        assert a["status"] == {"a": peer, "b": {**peer, "priority": -6}}
        assert a["metadata"]["generation"] == 2  # no status subresource: status is part of the object
        _, gone = api("PATCH", f"{peerings}/emu", {"status": {"a": None}}, merge)
        assert gone["status"] == {"b": {**peer, "priority": -6}}
        events = [json.loads(stream.readline()) for _ in range(2)]
    assert [e["type"] for e in events] == ["MODIFIED", "MODIFIED"]
    assert [sorted(e["object"]["status"]) for e in events] == [["a", "b"], ["b"]]
    assert events[0]["object"]["metadata"]["resourceVersion"] == a["metadata"]["resourceVersion"]
    assert events[1]["object"]["metadata"]["resourceVersion"] == gone["metadata"]["resourceVersion"]
    status, plural = api("GET", "/apis/kopf.dev/v1")
    found = {r["name"]: r for r in plural["resources"]}
    assert found["clusterkopfpeerings"]["namespaced"] is False and found["kopfpeerings"]["namespaced"] is True
    assert "clusterkopfpeerings/status" not in found
