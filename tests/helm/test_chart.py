"""The chart with the real helm v4.3.1: lint, templates (default and not), schema, Kubernetes 1.37 validity."""

import json

import kubernetes_validate
import pytest
import yaml
from crd_schema import CRD_PATH, apply_defaults, load_crd, validation_errors, version_schema
from helm_tool import CHART, HELM_VERSION, REPO

CUSTOM = {
    "image": {"repository": "registry.example/nanoserve/operator", "tag": "v9", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "watchNamespaces": ["ml", "team-b"],
    "resyncSeconds": 10,
    "replicas": 3,
    "peering": {"lifetimeSeconds": 45},
    "serviceAccount": {"name": "ops", "annotations": {"team": "ml"}},
    "healthPort": 9090,
    "resources": {"requests": {"cpu": "200m", "memory": "300Mi"}, "limits": {"memory": "600Mi"}},
    "podAnnotations": {"a": "b"},
    "podLabels": {"tier": "control"},
    "priorityClassName": "system-cluster-critical",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}
                ]
            }
        }
    },
    "example": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
    "podMonitor": {"enabled": True, "labels": {"release": "prom"}},
}
VALUES = {"default": {}, "custom": CUSTOM}
BAD = {
    "unknown key": {"replica": 2},
    "no replicas": {"replicas": 0},
    "peering lifetime": {"peering": {"lifetimeSeconds": 1}},
    "pull policy": {"image": {"pullPolicy": "Sometimes"}},
    "empty repository": {"image": {"repository": ""}},
    "namespace name": {"watchNamespaces": ["Not_A_Namespace"]},
    "duplicate namespace": {"watchNamespaces": ["a", "a"]},
    "privileged port": {"healthPort": 80},
    "resync": {"resyncSeconds": 0},
    "quantity": {"resources": {"limits": {"memory": "lots"}}},
    "pull secret": {"imagePullSecrets": ["regcred"]},
    "toleration": {"tolerations": [{"operator": "Maybe"}]},
    "node selector": {"nodeSelector": {"disk": 1}},
    "scrape interval": {"podMonitor": {"interval": "often"}},
}


def by_kind(objs: list[dict]) -> dict[tuple[str, str | None, str], dict]:
    return {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs}


def operator(objs: list[dict]) -> dict:
    (dep,) = [o for o in objs if o["kind"] == "Deployment"]
    return dep


def dep_replicas(objs: list[dict]) -> int:
    return operator(objs)["spec"]["replicas"]


def test_helm_is_the_pinned_version(helm):
    assert helm("version", "--short").stdout.startswith(HELM_VERSION)


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES)
def test_lint_strict(helm, values, tmp_path):
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    out = helm("lint", "--strict", str(CHART), "--namespace", "ml", "--values", str(tmp_path / "values.yaml"))
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES)
def test_every_rendered_object_is_valid_for_kubernetes_1_37(helm, values):
    objs = helm.template(values, namespace="ml")
    crds = {o["spec"]["names"]["kind"]: o for o in objs if o["kind"] == "CustomResourceDefinition"}
    crs = [o for o in objs if o["kind"] in crds]
    assert {"InferenceService", "ClusterKopfPeering", "KopfPeering"} == set(crds)
    assert {o["kind"] for o in crs} >= {"KopfPeering" if values.get("watchNamespaces") else "ClusterKopfPeering"}
    for obj in objs:
        if obj not in crs and obj["kind"] != "PodMonitor":  # (Prometheus Operator's kind: tested below)
            kubernetes_validate.validate(obj, "1.37", strict=True)
    for cr in crs:  # custom resources: against their CRDs, in the chart
        schema = version_schema(crds[cr["kind"]], cr["apiVersion"].split("/")[1])
        assert validation_errors(schema, apply_defaults(schema, cr)) == []
        assert (crds[cr["kind"]]["spec"]["scope"] == "Namespaced") == ("namespace" in cr["metadata"])


@pytest.mark.parametrize(
    "values, message",
    [
        ({"watchNamespaces": ["a"], "example": {"enabled": True}}, "watchNamespaces leaves out"),
        ({"serviceAccount": {"create": False, "name": ""}}, "serviceAccount.name is required"),
    ],
    ids=["example", "sa"],
)
def test_inconsistent_values_fail_with_a_message(helm, values, message):
    proc = helm.template(values, namespace="ml", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


@pytest.mark.parametrize("values", BAD.values(), ids=BAD)
def test_schema_rejects_bad_values(helm, values):
    proc = helm.template(values, check=False)
    assert proc.returncode != 0 and "values don't meet the specifications of the schema" in proc.stderr


def test_crds_are_the_ones_in_crds(helm):
    crds = [o for o in helm.template() if o["kind"] == "CustomResourceDefinition"]
    files = sorted((REPO / "crds").glob("*.yaml"))
    assert [p.name for p in files] == ["inferenceservice.yaml", "kopfpeering.yaml"]
    assert crds == [o for p in files for o in yaml.safe_load_all(p.read_text())]
    assert crds[0] == load_crd(CRD_PATH)
    for path in files:
        link = CHART / "crds" / path.name
        assert link.is_symlink() and link.resolve() == path.resolve()  # one source of truth


def test_operator_deployment_defaults(helm):
    objs = helm.template()
    pod = operator(objs)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert (
        c["image"] == f"ghcr.io/nanoserve/operator:{yaml.safe_load((CHART / 'Chart.yaml').read_text())['appVersion']}"
    )
    assert c["command"] == ["kopf", "run"] and "--all-namespaces" in c["args"] and "--standalone" not in c["args"]
    # Two replicas, one at work: kopf peering through the release's ClusterKopfPeering, each pod its identity.
    (peering,) = [o for o in objs if o["kind"] == "ClusterKopfPeering"]
    assert f"--peering={peering['metadata']['name']}" in c["args"] and peering["metadata"]["name"] == "nanoserve"
    assert dep_replicas(objs) == 2 and operator(objs)["spec"]["strategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["NANOSERVE_PEERING_LIFETIME_SECONDS"]["value"] == "30"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # The probe hits the port and path kopf serves its liveness on.
    probe = c["livenessProbe"]["httpGet"]
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == probe["port"])
    assert f"--liveness=http://0.0.0.0:{port}{probe['path']}" in c["args"]
    assert pod["serviceAccountName"] in {o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"}
    kinds = {o["kind"] for o in objs}
    assert "Role" not in kinds and "InferenceService" not in kinds  # cluster-wide, no example by default


def test_replicas_spread_over_nodes_and_a_drain_evicts_one_at_a_time(helm):
    objs = helm.template()
    dep = operator(objs)
    labels = dep["spec"]["selector"]["matchLabels"]
    (term,) = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"] == {
        "topologyKey": "kubernetes.io/hostname",
        "labelSelector": {"matchLabels": labels},
    }
    (pdb,) = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": labels}}
    assert labels.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    # One replica: no budget (it would block every drain); the user's own affinity replaces the default.
    single = helm.template({"replicas": 1, "affinity": CUSTOM["affinity"]})
    assert not [o for o in single if o["kind"] == "PodDisruptionBudget"]
    assert operator(single)["spec"]["template"]["spec"]["affinity"] == CUSTOM["affinity"]


def test_custom_values_reach_the_objects(helm):
    objs = helm.template(CUSTOM, namespace="ml")
    dep = operator(objs)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "registry.example/nanoserve/operator:v9" and c["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert pod[key] == CUSTOM[key]
    assert c["resources"] == CUSTOM["resources"]
    assert dep["spec"]["template"]["metadata"]["annotations"] == {"a": "b"}
    assert dep["spec"]["template"]["metadata"]["labels"]["tier"] == "control"
    assert {"--namespace=ml", "--namespace=team-b"} <= set(c["args"]) and "--all-namespaces" not in c["args"]
    assert "--liveness=http://0.0.0.0:9090/healthz" in c["args"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NANOSERVE_RESYNC_SECONDS"] == "10" and env["NANOSERVE_PEERING_LIFETIME_SECONDS"] == "45"
    assert dep["spec"]["replicas"] == 3 and "--peering=nanoserve" in c["args"]
    assert pod["serviceAccountName"] == "ops"
    objs_by = by_kind(objs)
    assert objs_by["ServiceAccount", "ml", "ops"]["metadata"]["annotations"] == {"team": "ml"}
    for ns in ("ml", "team-b"):  # namespace-scoped: a Role per watched namespace
        assert ("Role", ns, "nanoserve") in objs_by and ("RoleBinding", ns, "nanoserve") in objs_by
    assert {k[1] for k in objs_by if k[0] == "Role"} == {"ml", "team-b"}
    # kopf peers in each namespace it serves: a KopfPeering there, its rules in that namespace's Role only.
    assert {k[1:] for k in objs_by if k[0] == "KopfPeering"} == {("ml", "nanoserve"), ("team-b", "nanoserve")}
    assert not [k for k in objs_by if k[0] == "ClusterKopfPeering"]
    peering = {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"]}
    peering_rules = [
        {**peering, "verbs": ["list", "watch"]},
        {**peering, "resourceNames": ["nanoserve"], "verbs": ["get", "patch"]},
    ]
    for ns in ("ml", "team-b"):
        assert [r for r in objs_by["Role", ns, "nanoserve"]["rules"] if "kopf.dev" in r["apiGroups"]] == peering_rules
    assert not [r for r in objs_by["ClusterRole", None, "nanoserve"]["rules"] if "kopf.dev" in r["apiGroups"]]


def test_example_is_examples_inferenceservice(helm):
    (cr,) = [
        o for o in helm.template({"example": {"enabled": True}}, namespace="ml") if o["kind"] == "InferenceService"
    ]
    example = yaml.safe_load((REPO / "examples" / "inferenceservice.yaml").read_text())
    assert (cr["metadata"]["name"], cr["spec"]) == (example["metadata"]["name"], example["spec"])
    assert cr["metadata"]["namespace"] == "ml"


def test_notes_tell_how_to_apply_and_reach_the_gateway(helm):
    notes = helm("install", "nanoserve", str(CHART), "--dry-run=client", "--namespace", "ml").stdout
    assert "kubectl apply -n ml -f examples/inferenceservice.yaml" in notes
    assert "kubectl port-forward -n ml svc/smollm2" in notes and "/v1/completions" in notes


def test_values_schema_is_valid_json_schema():
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)
    jsonschema.validate(CUSTOM, schema)


def test_grafana_dashboard_is_a_configmap_the_sidecar_finds(helm):
    assert not [o for o in helm.template() if o["kind"] == "ConfigMap"]  # off by default
    (cm,) = [
        o for o in helm.template({"grafanaDashboard": {"enabled": True}}, namespace="mon") if o["kind"] == "ConfigMap"
    ]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and cm["metadata"]["namespace"] == "mon"
    assert json.loads(cm["data"]["nanoserve.json"]) == json.loads((CHART / "dashboards" / "nanoserve.json").read_text())


@pytest.mark.parametrize("watch", [[], ["ml", "team-b"]], ids=["cluster-wide", "namespaced"])
def test_the_pod_monitor_selects_every_pod_the_operator_renders(helm, watch):
    from crd_schema import default_spec

    from nanoserve.operator.render import render

    values = {"podMonitor": {"enabled": True, "labels": {"release": "prom"}}, "watchNamespaces": watch}
    (monitor,) = [o for o in helm.template(values, namespace="mon") if o["kind"] == "PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["labels"]["release"] == "prom"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == ({"matchNames": watch} if watch else {"any": True})
    wanted = spec["selector"]["matchLabels"].items()
    pods = [o for o in render("demo", "ml", default_spec({})) if o["kind"] == "Deployment"]
    assert len(pods) == 2
    for deployment in pods:
        template = deployment["spec"]["template"]
        assert wanted <= template["metadata"]["labels"].items()
        ports = {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
        assert [e["port"] for e in spec["podMetricsEndpoints"]] == ["http"] and "http" in ports
    assert not [o for o in helm.template({}, namespace="mon") if o["kind"] == "PodMonitor"]
