"""spec.router inferencePool: an InferencePool valid for GAIE's published v1 CRD (vendored), selecting the engine
pods, whose endpoint picker Service reaches the gateway pods' ext-proc port, where `nanoserve epp` listens."""

import pathlib

import kubernetes_validate
import pytest
from crd_schema import apply_defaults, default_spec, load_crd, validation_errors, version_schema

from nanoserve.common.flags import add_flags
from nanoserve.gateway import cli
from nanoserve.gateway.epp import EppConfig
from nanoserve.operator.render import render, render_stale

POOL_CRD = pathlib.Path(__file__).with_name("vendored") / "inference.networking.k8s.io_inferencepools.yaml"
SPECS = {
    "defaults": {"router": "inferencePool"},
    "overrides": {
        "router": "inferencePool",
        "replicas": 3,
        "apiKeySecret": "key",
        "gateway": {"replicas": 2, "policy": "least-loaded", "pod": {"nodeSelector": {"pool": "cpu"}}},
    },
}


def children(spec: dict) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in render("demo", "ml", default_spec(spec))}


def flags(args: list[str]) -> dict[str, str]:
    return dict(zip(args[::2], args[1::2]))


@pytest.fixture(scope="module")
def pool_schema() -> dict:
    crd = load_crd(POOL_CRD)
    assert crd["spec"]["group"] == "inference.networking.k8s.io" and crd["spec"]["names"]["kind"] == "InferencePool"
    return version_schema(crd, "v1")


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_the_inference_pool_is_valid_for_gaies_v1_crd_and_the_rest_for_kubernetes(spec, pool_schema):
    objs = children(spec)
    pool = objs["InferencePool", "demo"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert validation_errors(pool_schema, apply_defaults(pool_schema, pool)) == []
    for obj in objs.values():
        if obj["kind"] != "InferencePool":
            kubernetes_validate.validate(obj, "1.37", strict=True)


def test_the_vendored_schema_rejects_what_gaie_rejects(pool_schema):
    """The check above can fail: GAIE's own rules (required fields, CEL) are in force."""
    pool = children(SPECS["defaults"])["InferencePool", "demo"]
    no_port = {**pool, "spec": {**pool["spec"], "endpointPickerRef": {"name": "demo-epp"}}}
    assert any("port is required" in e for e in validation_errors(pool_schema, apply_defaults(pool_schema, no_port)))
    twice = {**pool, "spec": {**pool["spec"], "targetPorts": [{"number": 8000}, {"number": 8000}]}}
    assert any("unique" in e for e in validation_errors(pool_schema, apply_defaults(pool_schema, twice)))


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_the_pool_selects_the_engines_and_its_picker_is_the_gateway(spec):
    objs = children(spec)
    pool = objs["InferencePool", "demo"]["spec"]
    engine_pod = objs["Deployment", "demo-engine"]["spec"]["template"]
    (engine,) = engine_pod["spec"]["containers"]
    assert pool["selector"]["matchLabels"].items() <= engine_pod["metadata"]["labels"].items()
    assert [p["number"] for p in pool["targetPorts"]] == [p["containerPort"] for p in engine["ports"]]
    ref = pool["endpointPickerRef"]
    assert (ref["kind"], ref["failureMode"]) == ("Service", "FailClose")
    svc = objs["Service", ref["name"]]["spec"]
    (port,) = [p for p in svc["ports"] if p["port"] == ref["port"]["number"]]
    assert port["appProtocol"] == "kubernetes.io/h2c"  # gRPC: HTTP/2 in clear text
    gateway = objs["Deployment", "demo-gateway"]["spec"]["template"]
    assert svc["selector"].items() <= gateway["metadata"]["labels"].items()
    assert not svc["selector"].items() <= engine_pod["metadata"]["labels"].items()
    (c,) = gateway["spec"]["containers"]
    (grpc,) = [p for p in c["ports"] if p["name"] == port["targetPort"]]
    # The container runs the picker, listening where the Service sends: its real parser reads the args.
    assert c["command"] == ["nanoserve", "epp"]
    parser = cli.build_parser()
    add_flags(parser, EppConfig)
    args = parser.parse_args(c["args"])
    assert args.grpc_port == grpc["containerPort"] and (args.service, args.namespace) == ("demo-engine", "ml")
    assert args.policy == default_spec(spec)["gateway"]["policy"]
    # Beside the pool, the gateway's own Service keeps serving HTTP (status.url).
    assert objs["Service", "demo"]["spec"]["selector"].items() <= gateway["metadata"]["labels"].items()


def test_the_pool_is_applied_last():
    """A cluster without GAIE's CRD refuses the InferencePool: the engines and the gateway are in place by then."""
    objs = render("demo", "ml", default_spec(SPECS["defaults"]))
    assert objs[-1]["kind"] == "InferencePool"
    assert [o["kind"] for o in objs].index("Deployment") < len(objs) - 1


def test_router_gateway_renders_no_pool_and_switching_back_removes_it():
    plain = children({})
    assert ("InferencePool", "demo") not in plain and ("Service", "demo-epp") not in plain
    (c,) = plain["Deployment", "demo-gateway"]["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["nanoserve", "gateway"] and "--grpc-port" not in c["args"]
    stale = {(o["kind"], o["metadata"]["name"]) for o in render_stale("demo", "ml", default_spec({}))}
    assert {("InferencePool", "demo"), ("Service", "demo-epp")} <= stale
    pooled = {(o["kind"], o["metadata"]["name"]) for o in render_stale("demo", "ml", default_spec(SPECS["defaults"]))}
    assert not pooled & {("InferencePool", "demo"), ("Service", "demo-epp"), ("Deployment", "demo-gateway")}


def test_the_crd_defaults_the_router_and_refuses_a_pool_without_its_picker():
    schema = version_schema(load_crd())
    assert default_spec({})["router"] == "gateway"

    def errors(spec: dict) -> list[str]:
        obj = {"apiVersion": "serving.nanoserve.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "x"}}
        return validation_errors(schema, apply_defaults(schema, {**obj, "spec": spec}))

    assert errors({"router": "inferencePool"}) == []
    assert any("gateway.enabled" in e for e in errors({"router": "inferencePool", "gateway": {"enabled": False}}))
    assert any("gateway.workers" in e for e in errors({"router": "inferencePool", "gateway": {"workers": 2}}))
    assert errors({"gateway": {"workers": 2}}) == []
    assert any("router" in e for e in errors({"router": "envoy"}))
