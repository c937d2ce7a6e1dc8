"""spec.model.s3 and spec.modelCache: what the CRD accepts, and what the operator renders for them (valid
Kubernetes 1.37 objects, wired as the download step and the engine expect)."""

import tomllib

import kubernetes_validate
import pytest
from crd_schema import apply_defaults, default_spec, load_crd, validation_errors, version_schema
from dockerfile_parse import instructions
from op_harness import REPO

from nanoserve.operator.render import render, render_stale

S3 = {"bucket": "models", "path": "qwen3/0.6b"}
MINIO = {**S3, "endpoint": "http://minio.storage:9000", "region": "eu-west-1", "credentialsSecret": "s3-creds"}
CREATE = {"create": True, "size": "50Gi", "storageClassName": "nfs"}


@pytest.fixture(scope="module")
def schema():
    return version_schema(load_crd())


def errors(schema, spec: dict) -> list[str]:
    obj = {"apiVersion": "serving.nanoserve.io/v1alpha1", "kind": "InferenceService", "metadata": {"name": "x"}}
    return validation_errors(schema, apply_defaults(schema, {**obj, "spec": spec}))


GOOD = {
    "s3 on AWS by role": {"model": {"s3": S3}},
    "s3 on MinIO with keys": {"model": {"s3": MINIO}},
    "hf into a created cache": {"model": {"name": "Qwen/Qwen3-0.6B"}, "modelCache": CREATE},
    "s3 into an existing cache": {"model": {"s3": S3}, "modelCache": {"claimName": "shared-models"}},
}

BAD = {
    "s3 and hf": ({"model": {"s3": S3, "name": "Qwen/Qwen3-0.6B"}}, "exactly one of name, s3, pvc or builtin"),
    "s3 without path": ({"model": {"s3": {"bucket": "models"}}}, "path"),
    "s3 path escapes": ({"model": {"s3": {**S3, "path": "a/../../b"}}}, "must not contain"),
    "s3 endpoint not a URL": ({"model": {"s3": {**S3, "endpoint": "minio:9000"}}}, "does not match"),
    "bucket not a bucket name": ({"model": {"s3": {**S3, "bucket": "Models_"}}}, "does not match"),
    "cache of a builtin": ({"modelCache": CREATE}, "modelCache is for a downloaded model"),
    "cache of a pvc": ({"model": {"pvc": "m", "path": "x"}, "modelCache": CREATE}, "downloaded model"),
    "cache both claimed and created": (
        {"model": {"s3": S3}, "modelCache": {**CREATE, "claimName": "c"}},
        "exactly one of claimName or create",
    ),
    "cache of neither": ({"model": {"s3": S3}, "modelCache": {}}, "exactly one of claimName or create"),
    "created cache without a size": ({"model": {"s3": S3}, "modelCache": {"create": True}}, "needs modelCache.size"),
    "size of a claimed cache": (
        {"model": {"s3": S3}, "modelCache": {"claimName": "c", "size": "1Gi"}},
        "are for modelCache.create",
    ),
    "unknown access mode": (
        {"model": {"s3": S3}, "modelCache": {**CREATE, "accessMode": "ReadOnlyMany"}},
        "is not one of",
    ),
}


@pytest.mark.parametrize("spec", GOOD.values(), ids=GOOD.keys())
def test_the_crd_accepts(schema, spec):
    assert errors(schema, spec) == []


@pytest.mark.parametrize("spec,needle", BAD.values(), ids=BAD.keys())
def test_the_crd_rejects(schema, spec, needle):
    found = errors(schema, spec)
    assert found and any(needle in e for e in found), found


def children(spec: dict) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in render("demo", "ml", default_spec(spec))}


def pod_of(objs: dict) -> dict:
    return objs["Deployment", "demo-engine"]["spec"]["template"]["spec"]


def model_arg(pod: dict) -> str:
    args = pod["containers"][0]["args"]
    return args[args.index("--model") + 1]


@pytest.mark.parametrize("spec", GOOD.values(), ids=GOOD.keys())
def test_rendered_objects_are_valid_kubernetes_1_37(spec):
    # What these fields change: the engine Deployment and the cache's claim (test_render.py checks the rest).
    changed = [o for k, o in children(spec).items() if k in {("Deployment", "demo-engine")} or k[0].endswith("Claim")]
    for obj in changed:
        kubernetes_validate.validate(obj, "1.37", strict=True)


def test_s3_renders_boto3s_standard_environment_from_the_spec_and_secret():
    pod = pod_of(children({"model": {"s3": MINIO}}))
    (init,) = pod["initContainers"]
    assert init["command"][-2:] == ["s3://models/qwen3/0.6b", "/models/s3/models/qwen3/0.6b"]
    assert model_arg(pod) == "/models/s3/models/qwen3/0.6b"  # where the engine reads is where it lands
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in init["env"]}
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio.storage:9000" and env["AWS_DEFAULT_REGION"] == "eu-west-1"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the Secret's keys, as KServe names them
        assert env[key] == {"secretKeyRef": {"name": "s3-creds", "key": key}}
    engine_env = {e["name"] for e in pod["containers"][0]["env"]}
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & engine_env  # only the download step holds them
    served = pod["containers"][0]["args"]
    assert served[served.index("--served-model-name") + 1] == "qwen3/0.6b"
    (vol,) = [v for v in pod["volumes"] if v["name"] == "model"]
    assert vol == {"name": "model", "emptyDir": {}}  # no cache: once per pod, as a Hugging Face repo


def test_s3_without_a_secret_leaves_credentials_to_the_pods_identity():
    (init,) = pod_of(children({"model": {"s3": S3}}))["initContainers"]
    assert not [e for e in init["env"] if e["name"].startswith("AWS_")]


def test_a_created_cache_is_a_claim_that_the_engines_mount():
    objs = children({"model": {"name": "Qwen/Qwen3-0.6B"}, "modelCache": CREATE})
    pvc = objs["PersistentVolumeClaim", "demo-model-cache"]
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "50Gi"}},
        "storageClassName": "nfs",
    }
    assert list(objs).index(("PersistentVolumeClaim", "demo-model-cache")) < list(objs).index(
        ("Deployment", "demo-engine")
    )
    pod = pod_of(objs)
    (vol,) = [v for v in pod["volumes"] if v["name"] == "model"]
    assert vol["persistentVolumeClaim"] == {"claimName": "demo-model-cache"}
    (init,) = pod["initContainers"]
    assert init["command"][-2:] == ["hf://Qwen/Qwen3-0.6B", "/models/hf/Qwen/Qwen3-0.6B"]
    assert model_arg(pod) == "/models/hf/Qwen/Qwen3-0.6B"
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model"]
    assert mount["readOnly"] is True  # the engine only reads the shared cache; the download step writes it
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def test_an_existing_cache_is_mounted_not_created():
    objs = children({"model": {"s3": S3}, "modelCache": {"claimName": "shared-models"}})
    assert not [k for k in objs if k[0] == "PersistentVolumeClaim"]
    (vol,) = [v for v in pod_of(objs)["volumes"] if v["name"] == "model"]
    assert vol["persistentVolumeClaim"] == {"claimName": "shared-models"}


def test_turning_the_cache_off_never_deletes_it():
    # A filled cache is costly to refill: it stays until the InferenceService goes (its owner reference).
    assert not [
        o
        for o in render_stale("demo", "ml", default_spec({"model": {"s3": S3}}))
        if o["kind"] == "PersistentVolumeClaim"
    ]


def test_the_download_step_reports_through_its_termination_message():
    (init,) = pod_of(children({"model": {"s3": S3}}))["initContainers"]
    assert init["args"] == ["--report", init["terminationMessagePath"]]
    assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_boto3_ships_in_the_engine_image_that_runs_the_download_and_nowhere_else():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    boto = lambda deps: any(d.startswith("boto3") for d in deps)  # noqa: E731
    assert boto(extras["engine"]) and not boto(extras["gateway"]) and not boto(extras["operator"])
    (init,) = pod_of(children({"model": {"s3": S3}}))["initContainers"]
    assert init["image"] == default_spec({})["image"]  # the engine's image, built from engine.Dockerfile
    installs = " ".join(v for op, v in instructions(REPO / "docker" / "engine.Dockerfile") if op == "RUN")
    assert "[engine]" in installs
    assert init["command"][:3] == ["python", "-m", "nanoserve.engine_pod.fetch_model"]
