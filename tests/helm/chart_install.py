"""End to end: the chart installed by helm-sdkpy into the emulated API server, then the operator started
from the installed Deployment's own command, args and env, reconciling InferenceServices applied by kubectl.

Every request is recorded by the emulator; the operator authenticates with its own token, so its calls
can be told apart from helm's and kubectl's (test_rbac.py compares them with the chart's RBAC).
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator

import yaml
from helm_tool import CHART, REPO
from op_harness import BIN, Kubectl
from openapi_stub import OpenAPIEmulatorThread
from poll import until
from procs import reserve_port
from rbac_rules import Call, calls_of

RELEASE, RELEASE_NS = "nanoserve", "nanoserve"
EXAMPLE = REPO / "examples" / "inferenceservice.yaml"
INFERENCE_POOL_CRD = REPO / "tests" / "operator" / "vendored" / "inference.networking.k8s.io_inferencepools.yaml"
KEDA_CRD = REPO / "tests" / "operator" / "vendored" / "keda.sh_scaledobjects.yaml"
CHART_KINDS = "deployments,serviceaccounts,roles,rolebindings,clusterroles,clusterrolebindings"


@dataclasses.dataclass
class Installed:
    release: dict  # what helm-sdkpy returned
    objects: list[dict]  # the chart's objects as the API server holds them
    deployment: dict
    kubectl: Kubectl
    operator_calls: list[Call]
    operator_log: str
    service_account: tuple[str, str]  # (namespace, name)
    gateway_roles: list[dict]  # Roles the operator created for gateways


def sdk_install(kubeconfig: str, values: dict) -> dict:
    proc = subprocess.run(
        [
            sys.executable,
            str(pathlib.Path(__file__).parent / "sdk_install.py"),
            kubeconfig,
            RELEASE_NS,
            RELEASE,
            str(CHART),
            json.dumps(values),
        ],
        env={**os.environ, "HELM_DRIVER": "memory"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"helm-sdkpy install failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def operator_command(deployment: dict, port: int, pod: str = "nanoserve-operator-0") -> tuple[list[str], dict]:
    """The chart's container command and env, with the liveness endpoint moved to a local port held for it;
    the env's references to the pod's fields resolved as the kubelet would, for a pod named `pod`."""
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    args = [
        re.sub(r"^--liveness=http://0\.0\.0\.0:\d+", f"--liveness=http://127.0.0.1:{port}", a)
        for a in c.get("args", [])
    ]
    fields = {"metadata.name": pod, "metadata.namespace": deployment["metadata"]["namespace"]}
    env = {
        e["name"]: e["value"] if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        for e in c.get("env", [])
    }
    return [str(BIN / c["command"][0]), *c["command"][1:], *args], env


def operator_kubeconfig(admin: pathlib.Path, token: str, path: pathlib.Path) -> str:
    config = yaml.safe_load(admin.read_text())
    config["users"][0]["user"]["token"] = token
    path.write_text(yaml.safe_dump(config))
    return str(path)


@contextlib.contextmanager
def installed_chart(
    tmp: pathlib.Path,
    values: dict,
    namespaces: list[str],
    isvcs: dict[str, list[dict]],
    unserved: dict[str, list[dict]],
) -> Iterator[Installed]:
    """Installs, applies examples/inferenceservice.yaml and `isvcs` (namespace -> CRs), and runs the operator
    until each is handled; `unserved` CRs go to namespaces the operator must leave alone."""
    with OpenAPIEmulatorThread() as em:
        admin = pathlib.Path(em.kubeconfig(tmp / "admin"))
        kubectl = Kubectl({**os.environ, "KUBECONFIG": str(admin), "PYTHONSAFEPATH": "1"})
        for ns in namespaces:
            kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        release = sdk_install(str(admin), values)
        kubectl(
            "apply", "--validate=false", "-f", str(INFERENCE_POOL_CRD)
        )  # GAIE's, as a Gateway installation brings it
        kubectl("apply", "--validate=false", "-f", str(KEDA_CRD))  # KEDA's: "kedaed" gets a ScaledObject
        objects = json.loads(
            kubectl("get", CHART_KINDS, "-A", "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "json").stdout
        )["items"]
        deployment = next(o for o in objects if o["kind"] == "Deployment")
        sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        token = f"system:serviceaccount:{RELEASE_NS}:{sa}"
        first = next(iter(isvcs))
        kubectl("apply", "--validate=false", "-n", first, "-f", str(EXAMPLE))
        isvcs = {**isvcs, first: [example(), *isvcs[first]]}
        for ns, crs in [*isvcs.items(), *unserved.items()]:
            for cr in crs:
                kubectl.apply(cr, ns)
        port = reserve_port()
        cmd, env = operator_command(deployment, port)
        log_path = tmp / "operator.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=tmp,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    **env,
                    "HOME": str(tmp),
                    "PYTHONSAFEPATH": "1",
                    "KUBECONFIG": operator_kubeconfig(admin, token, tmp / "operator"),
                },
            )
            try:
                for ns, crs in isvcs.items():
                    for cr in crs:
                        until(
                            lambda cr=cr, ns=ns: _handled(kubectl, proc, log_path, cr["metadata"]["name"], ns),
                            f"the operator to handle {ns}/{cr['metadata']['name']}",
                            60,
                        )
                # And one round of its resync loop over them (it reads each one afresh).
                wanted = {_isvc_path(ns, cr["metadata"]["name"]) for ns, crs in isvcs.items() for cr in crs}
                until(lambda: wanted <= _operator_gets(em, token), "a resync of every InferenceService", 60)
            finally:
                proc.terminate()
                proc.wait(30)
        requests = list(em.emulator.served)
        calls = calls_of(
            [
                (str(r.method.value), r.url.path, dict(r.params), r.headers.get("Content-Type", ""), _body_name(r.data))
                for r in requests
            ],
            {i for i, r in enumerate(requests) if r.headers.get("Authorization") == f"Bearer {token}"},
        )
        roles = json.loads(
            kubectl("get", "roles", "-A", "-l", "app.kubernetes.io/managed-by=nanoserve-operator", "-o", "json").stdout
        )["items"]
        # The operator has stopped (its calls are all in); the emulator serves on while the tests look.
        yield Installed(release, objects, deployment, kubectl, calls, log_path.read_text(), (RELEASE_NS, sa), roles)


def _isvc_path(ns: str, name: str) -> str:
    return f"/apis/serving.nanoserve.io/v1alpha1/namespaces/{ns}/inferenceservices/{name}"


def _operator_gets(em, token: str) -> set[str]:
    auth = f"Bearer {token}"
    return {
        r.url.path
        for r in list(em.emulator.served)
        if r.headers.get("Authorization") == auth and r.method.value == "GET"
    }


def _body_name(data) -> str:
    return str(((data or {}).get("metadata") or {}).get("name", "")) if isinstance(data, dict) else ""


def _handled(kubectl: Kubectl, proc: subprocess.Popen, log_path: pathlib.Path, name: str, ns: str) -> dict | None:
    assert proc.poll() is None, f"operator exited:\n{log_path.read_text()}"
    obj = kubectl.get("isvc", name, ns)
    st = (obj or {}).get("status", {})
    return obj if st.get("observedGeneration") == obj["metadata"]["generation"] else None


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def isvc(name: str, spec: dict) -> dict:
    return {
        "apiVersion": "serving.nanoserve.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {"device": "cpu", **spec},
    }


# Beyond the example: a gateway-less one (the operator deletes gateway children), one whose model
# PVC is missing (the operator looks it up), one with a model cache to create, one that scales to zero (its
# gateway's Role may set its scale), one with an InferencePool and one with a KEDA ScaledObject:
# between them, every call the operator can make.
EXTRA = [
    isvc("no-gateway", {"gateway": {"enabled": False}}),
    isvc("no-pvc", {"model": {"pvc": "absent", "path": "m"}}),
    isvc("cached", {"model": {"s3": {"bucket": "models", "path": "m"}}, "modelCache": {"create": True, "size": "1Gi"}}),
    isvc(
        "autoscaled",
        {"autoscaling": {"maxReplicas": 3}, "networkPolicy": {"enabled": True}, "scaleToZero": {"enabled": True}},
    ),
    isvc("pooled", {"router": "inferencePool"}),
    isvc("kedaed", {"autoscaling": {"maxReplicas": 3, "prometheusAddress": "http://prometheus.monitoring.svc:9090"}}),
]
MODES = {
    "cluster-wide": ({"resyncSeconds": 1}, {"ml": EXTRA}, {}),
    "namespaced": (
        {"resyncSeconds": 1, "watchNamespaces": ["ml", "team-b"]},
        {"ml": EXTRA, "team-b": [isvc("b", {})]},
        {"other": [isvc("ignored", {})]},
    ),
}
