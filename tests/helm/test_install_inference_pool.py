"""router inferencePool through the chart's operator: the API server (GAIE's CRD installed, its schema and CEL
enforced by the emulator) takes the InferencePool the operator applies, owned by its InferenceService."""


def test_the_operator_creates_the_inference_pool_and_its_pickers_service(installed):
    kubectl = installed.kubectl
    obj = kubectl.get("isvc", "pooled", "ml")
    conditions = {c["type"]: c for c in obj["status"]["conditions"]}
    assert conditions.get("Degraded", {}).get("status") != "True", conditions
    pool = kubectl.get("inferencepool", "pooled", "ml")
    assert pool["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    ref = pool["spec"]["endpointPickerRef"]
    assert kubectl.get("service", ref["name"], "ml")["spec"]["ports"][0]["port"] == ref["port"]["number"]
    # The others have none: their stale-object sweep deleted nothing that was theirs to keep.
    assert kubectl.get("inferencepool", "no-gateway", "ml") is None
