"""spec.autoscaling where KEDA is installed: a ScaledObject valid for KEDA's published CRD (vendored), on the
InferenceService's scale subresource, with a prometheus trigger on the engine metric; no HPA beside it, and
switching KEDA on or off leaves the other autoscaler stale (deleted)."""

import pathlib

import pytest
from crd_schema import apply_defaults, default_spec, load_crd, validation_errors, version_schema

from nanoserve.operator.keda import threshold
from nanoserve.operator.render import render, render_stale

KEDA_CRD = pathlib.Path(__file__).with_name("vendored") / "keda.sh_scaledobjects.yaml"
PROM = "http://prometheus.monitoring.svc:9090"
SPEC = {"autoscaling": {"minReplicas": 2, "maxReplicas": 8, "averageValue": "500m", "prometheusAddress": PROM}}
HPA, SO = ("HorizontalPodAutoscaler", "demo-engine"), ("ScaledObject", "demo-engine")


def kinds(objs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


@pytest.fixture(scope="module")
def keda_schema() -> dict:
    crd = load_crd(KEDA_CRD)
    assert crd["spec"]["group"] == "keda.sh" and crd["spec"]["names"]["kind"] == "ScaledObject"
    return version_schema(crd, "v1alpha1")


def test_with_keda_a_valid_scaled_object_replaces_the_hpa(keda_schema):
    objs = kinds(render("demo", "ml", default_spec(SPEC), keda=True))
    assert HPA not in objs
    so = objs[SO]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert validation_errors(keda_schema, apply_defaults(keda_schema, so)) == []
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "serving.nanoserve.io/v1alpha1",
        "kind": "InferenceService",
        "name": "demo",
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 8)
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": 300
    }
    (trigger,) = spec["triggers"]
    assert (trigger["type"], trigger["metricType"]) == ("prometheus", "AverageValue")
    meta = trigger["metadata"]
    assert meta["serverAddress"] == PROM and meta["threshold"] == "0.5"
    assert meta["query"] == 'sum(vllm:num_requests_waiting{namespace="ml",pod=~"demo-engine-.*"})'


def test_the_vendored_schema_rejects_what_keda_rejects(keda_schema):
    """The check above can fail: KEDA's required fields are in force."""
    so = kinds(render("demo", "ml", default_spec(SPEC), keda=True))[SO]
    no_target = {**so, "spec": {k: v for k, v in so["spec"].items() if k != "scaleTargetRef"}}
    assert validation_errors(keda_schema, apply_defaults(keda_schema, no_target)) != []
    no_type = {**so, "spec": {**so["spec"], "triggers": [{"metadata": {}}]}}
    assert validation_errors(keda_schema, apply_defaults(keda_schema, no_type)) != []


def test_without_keda_or_a_prometheus_the_hpa_as_before():
    assert SO not in kinds(render("demo", "ml", default_spec(SPEC), keda=False))
    assert HPA in kinds(render("demo", "ml", default_spec(SPEC), keda=False))
    no_prom = default_spec({"autoscaling": {"maxReplicas": 3}})
    assert HPA in kinds(render("demo", "ml", no_prom, keda=True))
    assert SO not in kinds(render("demo", "ml", no_prom, keda=True))


@pytest.mark.parametrize("keda", [True, False])
def test_switching_keda_leaves_the_other_autoscaler_stale(keda):
    spec = default_spec(SPEC)
    stale = kinds(render_stale("demo", "ml", spec, keda=keda))
    wanted = kinds(render("demo", "ml", spec, keda=keda))
    assert (HPA in stale, SO in stale) == (keda, not keda)
    assert not set(stale) & set(wanted)
    # Autoscaling turned off: both go.
    assert {HPA, SO} <= set(kinds(render_stale("demo", "ml", default_spec({}), keda=keda)))


def test_threshold_is_the_quantity_as_a_plain_number():
    assert [threshold(q) for q in (4, "4", "500m", "1.5k")] == ["4", "4", "0.5", "1500"]


ZERO = {**SPEC, "scaleToZero": {"enabled": True, "idleSeconds": 900}}


def gateway_flags(objs: dict) -> list[str]:
    (c,) = objs["Deployment", "demo-gateway"]["spec"]["template"]["spec"]["containers"]
    return c["args"]


def test_scale_to_zero_with_keda_lets_keda_idle_down_and_the_held_requests_wake_it(keda_schema):
    objs = kinds(render("demo", "ml", default_spec(ZERO), keda=True))
    so = objs[SO]
    assert validation_errors(keda_schema, apply_defaults(keda_schema, so)) == []
    assert (so["spec"]["minReplicaCount"], so["spec"]["cooldownPeriod"]) == (0, 900)
    query = so["spec"]["triggers"][0]["metadata"]["query"]
    assert 'nanoserve_gateway_held_requests{namespace="ml",pod=~"demo-gateway-.*"}' in query
    assert "vllm:num_requests_waiting" in query and query.count("or vector(0)") == 2
    args = gateway_flags(objs)
    assert args[args.index("--scale-target") + 1] == "demo"
    assert "--scale-to-zero-after" not in args  # KEDA scales down; two scalers would race


def test_scale_to_zero_without_keda_the_gateway_idles_down_and_may_patch_only_its_own_scale():
    objs = kinds(render("demo", "ml", default_spec(ZERO), keda=False))
    assert objs[HPA]["spec"]["minReplicas"] == 2  # an HPA at 0 replicas stands still until the gateway wakes it
    args = gateway_flags(objs)
    assert args[args.index("--scale-to-zero-after") + 1] == "900"
    assert args[args.index("--activation-timeout") + 1] == "300"
    scale_rules = [r for r in objs["Role", "demo-gateway"]["rules"] if r["resources"] == ["inferenceservices/scale"]]
    assert scale_rules == [
        {
            "apiGroups": ["serving.nanoserve.io"],
            "resources": ["inferenceservices/scale"],
            "resourceNames": ["demo"],
            "verbs": ["get", "patch"],
        }
    ]
    off = kinds(render("demo", "ml", default_spec(SPEC), keda=False))
    assert "--scale-target" not in gateway_flags(off)
    assert all(r["resources"] != ["inferenceservices/scale"] for r in off["Role", "demo-gateway"]["rules"])
