"""The CRD: valid for Kubernetes 1.37, examples pass it, bad specs fail it (schema and CEL)."""

import pathlib

import kubernetes_validate
import pytest
import yaml
from crd_schema import apply_defaults, default_spec, load_crd, validation_errors, version_schema

EXAMPLES = sorted((pathlib.Path(__file__).parents[2] / "examples").glob("inferenceservice*.yaml"))


@pytest.fixture(scope="module")
def schema():
    return version_schema(load_crd())


def isvc(spec: dict) -> dict:
    return {
        "apiVersion": "serving.nanoserve.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "x"},
        "spec": spec,
    }


def test_crd_is_a_valid_1_37_object():
    kubernetes_validate.validate(load_crd(), "1.37", strict=True)


def test_crd_shape():
    crd = load_crd()
    assert crd["spec"]["group"] == "serving.nanoserve.io"
    assert "isvc" in crd["spec"]["names"]["shortNames"]
    (v,) = crd["spec"]["versions"]
    assert v["name"] == "v1alpha1" and v["served"] and v["storage"]
    assert "status" in v["subresources"]
    assert [c["name"] for c in v["additionalPrinterColumns"]] == ["Model", "Replicas", "Ready", "URL", "Age"]


def _schema_at(schema: dict, json_path: str) -> dict:
    node = schema
    for part in json_path.strip(".").split("."):
        node = node["properties"][part]
    return node


def test_printer_columns_and_scale_paths_exist_in_the_schema(schema):
    v = load_crd()["spec"]["versions"][0]
    for col in v["additionalPrinterColumns"]:
        if not col["jsonPath"].startswith(".metadata"):
            assert _schema_at(schema, col["jsonPath"])["type"] == col["type"]
    scale = v["subresources"]["scale"]
    assert _schema_at(schema, scale["specReplicasPath"])["type"] == "integer"
    assert _schema_at(schema, scale["statusReplicasPath"])["type"] == "integer"
    assert _schema_at(schema, scale["labelSelectorPath"])["type"] == "string"


def test_defaults_cover_everything_the_renderer_reads():
    spec = default_spec()
    assert spec["model"] == {"builtin": "smollm2-135m"}
    engine_props = version_schema(load_crd())["properties"]["spec"]["properties"]["engine"]["properties"]
    optional = {"extraArgs", "maxNumBatchedTokens", "maxModelLen", "pod"}  # unset: the engine's own default (per
    # device, or the model's); no pod overrides
    assert {k for k, v in engine_props.items() if "default" in v} == set(engine_props) - optional
    assert set(spec["engine"]) == set(engine_props) - optional
    assert set(spec["gateway"]) == {"enabled", "replicas", "workers", "policy", "image"}
    assert spec["resources"] == {"gpuResourceName": "nvidia.com/gpu"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(schema, path):
    (obj,) = yaml.safe_load_all(path.read_text())
    assert validation_errors(schema, apply_defaults(schema, obj)) == []


BAD = {
    "two model sources": ({"model": {"builtin": "smollm2-135m", "name": "Qwen/Qwen3-0.6B"}}, "exactly one"),
    "no model source": ({"model": {}}, "exactly one"),
    "pvc without path": ({"model": {"pvc": "models"}}, "go together"),
    "path escapes the volume": ({"model": {"pvc": "models", "path": "a/../../etc"}}, "must not contain"),
    "absolute path": ({"model": {"pvc": "models", "path": "/etc"}}, "relative"),
    "unknown builtin": ({"model": {"builtin": "gpt-5"}}, "is not one of"),
    "tp 9": ({"tensorParallelSize": 9}, "maximum"),
    "tp 0": ({"tensorParallelSize": 0}, "minimum"),
    "tp on cpu": ({"tensorParallelSize": 2, "device": "cpu"}, "needs device gpu"),
    "gpus in resources": ({"resources": {"limits": {"nvidia.com/gpu": 4}}}, "tensorParallelSize"),
    "managed flag in extraArgs": ({"engine": {"extraArgs": ["--port=9000"]}}, "must not set"),
    "tp alias in extraArgs": ({"engine": {"extraArgs": ["-tp", "4"]}}, "must not set"),
    "negative replicas": ({"replicas": -1}, "minimum"),
    "unknown policy": ({"gateway": {"policy": "random"}}, "is not one of"),
    "memory utilization 0": ({"engine": {"gpuMemoryUtilization": 0}}, "minimum"),
    "block size not a multiple of 16": ({"engine": {"kvcacheBlockSize": 100}}, "multiple"),
    "bad secret name": ({"apiKeySecret": "Not_A_Name"}, "does not match"),
    "gpus in resources under their own name": (
        {"resources": {"gpuResourceName": "amd.com/gpu", "limits": {"amd.com/gpu": 2}}},
        "tensorParallelSize",
    ),
    "gpu resource without a domain": ({"resources": {"gpuResourceName": "gpu"}}, "does not match"),
    "a pod volume named like the operator's": (
        {"engine": {"pod": {"volumes": [{"name": "cache", "emptyDir": {}}]}}},
        "must not reuse",
    ),
    "a mount of no pod volume": (
        {"gateway": {"pod": {"volumeMounts": [{"name": "x", "mountPath": "/x"}]}}},
        "names one of pod.volumes",
    ),
    "an env entry without a name": ({"engine": {"pod": {"env": [{"value": "1"}]}}}, "name"),
    "autoscaling without a maximum": ({"autoscaling": {"minReplicas": 2}}, "maxReplicas"),
    "autoscaling min above max": ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "must not exceed"),
    "a Prometheus address without a scheme": (
        {"autoscaling": {"maxReplicas": 2, "prometheusAddress": "prometheus:9090"}},
        "prometheusAddress",
    ),
    "a token for a model on a PVC": ({"model": {"pvc": "m", "path": "x", "tokenSecret": "hf"}}, "tokenSecret"),
    "scale to zero without the gateway": (
        {"scaleToZero": {"enabled": True}, "gateway": {"enabled": False}},
        "needs the gateway",
    ),
    "scale to zero holding no request": ({"scaleToZero": {"enabled": True, "maxHeldRequests": 0}}, "minimum"),
}


@pytest.mark.parametrize("spec,needle", BAD.values(), ids=BAD.keys())
def test_bad_specs_are_rejected(schema, spec, needle):
    errors = validation_errors(schema, apply_defaults(schema, isvc(spec)))
    assert errors and any(needle in e for e in errors), errors


def test_extra_args_that_are_not_managed_pass(schema):
    obj = isvc({"engine": {"extraArgs": ["--max-num-seqs-per-user", "4", "--portable"]}})
    assert validation_errors(schema, apply_defaults(schema, obj)) == []
