"""spec.engine.pod / spec.gateway.pod: what a platform team sets on the pods the operator renders
(scheduling, image pulls, extra env and volumes), merged in without displacing what the operator needs."""

# Pod-spec fields taken as given (the CRD checks their shape, the API server the rest).
_AS_GIVEN = ("nodeSelector", "affinity", "topologySpreadConstraints", "priorityClassName", "runtimeClassName")


def apply_pod_overrides(template: dict, container: dict, overrides: dict | None) -> None:
    """Merge `overrides` into a Deployment's pod `template` and its main `container` (in place): the fields
    above are set, tolerations, image pull secrets, env, volumes and mounts are added after the
    operator's own (a later env entry of the same name wins, as Kubernetes reads it), annotations join the
    pod's."""
    if not overrides:
        return
    pod = template["spec"]
    for key in _AS_GIVEN:
        if key in overrides:
            pod[key] = overrides[key]
    for key in ("tolerations", "imagePullSecrets", "volumes"):
        if overrides.get(key):
            pod[key] = pod.get(key, []) + list(overrides[key])
    for key in ("env", "volumeMounts"):
        if overrides.get(key):
            container[key] = container.get(key, []) + list(overrides[key])
    if overrides.get("annotations"):
        meta = template.setdefault("metadata", {})
        meta["annotations"] = {**meta.get("annotations", {}), **overrides["annotations"]}
