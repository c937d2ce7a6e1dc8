"""spec.autoscaling with KEDA installed, through the chart's operator: the API server (KEDA's CRD installed, its
schema enforced by the emulator) takes the ScaledObject the operator applies, owned by its InferenceService,
and no HPA is made beside it; without a prometheusAddress ("autoscaled") the HPA as before."""


def test_the_operator_creates_an_owned_scaled_object_and_no_hpa(installed):
    kubectl = installed.kubectl
    obj = kubectl.get("isvc", "kedaed", "ml")
    conditions = {c["type"]: c for c in obj["status"]["conditions"]}
    assert conditions.get("Degraded", {}).get("status") != "True", conditions
    so = kubectl.get("scaledobjects.keda.sh", "kedaed-engine", "ml")
    assert so["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    assert so["spec"]["scaleTargetRef"]["name"] == "kedaed"
    hpas = kubectl("get", "horizontalpodautoscalers.v2.autoscaling", "-n", "ml", "-o", "name").stdout.split()
    assert "horizontalpodautoscaler.autoscaling/kedaed-engine" not in hpas
    assert "horizontalpodautoscaler.autoscaling/autoscaled-engine" in hpas
