"""Where the engine finds its model: a builtin, a folder on a PVC, or a download (Hugging Face or S3) that an
init container makes before the engine starts, into an emptyDir or into the shared model cache (modelCache)."""

from nanoserve.operator.security import container_security

MODELS_DIR = "/models"
REPORT_PATH = "/dev/termination-log"  # the download step's outcome, read back from the pod's status


def model_summary(model: dict) -> str:
    """One short string for `kubectl get isvc` (the Model column)."""
    if "builtin" in model:
        return model["builtin"]
    if "pvc" in model:
        return f"pvc://{model['pvc']}/{model['path']}"
    return source_uri(model)


def source_uri(model: dict) -> str:
    """A downloaded model's source, as the download step takes it: hf://org/name or s3://bucket/prefix."""
    if "s3" in model:
        return f"s3://{model['s3']['bucket']}/{model['s3']['path'].strip('/')}"
    return f"hf://{model['name']}"


def served_model_name(spec: dict) -> str:
    """The model's name in the API: spec.servedModelName, else the model as the user gave it (vLLM's rule)."""
    if spec.get("servedModelName"):
        return spec["servedModelName"]
    model = spec["model"]
    if "s3" in model:
        return model["s3"]["path"].strip("/")
    return model.get("builtin") or model.get("name") or model["path"]


def model_folder(model: dict, cached: bool) -> str:
    """Where a downloaded model lands. In the cache, under a key per source (hf/..., s3/bucket/...), so that
    services sharing one cache volume share each model and never mix two. Alone in its emptyDir, a Hugging
    Face repo keeps the folder it always had."""
    if "s3" in model or cached:
        return f"{MODELS_DIR}/{source_uri(model).replace('://', '/', 1)}"
    return f"{MODELS_DIR}/{model['name']}"


def download_env(model: dict) -> list[dict]:
    """The standard variables each client reads: huggingface_hub's HF_TOKEN (key `token` of tokenSecret) for
    gated repos; boto3's AWS_* for S3, with the keys of credentialsSecret named as KServe names them (without
    one, boto3's own chain finds IRSA, pod identity or the node's role)."""
    env = [{"name": "HF_HOME", "value": "/cache/huggingface"}]
    secret = lambda var, name, key: {"name": var, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}  # noqa: E731
    if model.get("tokenSecret"):
        env.append(secret("HF_TOKEN", model["tokenSecret"], "token"))
    s3 = model.get("s3")
    if s3:
        if s3.get("endpoint"):
            env.append({"name": "AWS_ENDPOINT_URL_S3", "value": s3["endpoint"]})
        if s3.get("region"):
            env.append({"name": "AWS_DEFAULT_REGION", "value": s3["region"]})
        if s3.get("credentialsSecret"):
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                env.append(secret(key, s3["credentialsSecret"], key))
    return env


def model_source(model: dict, image: str, cache_claim: str | None) -> tuple[str, list[dict], list[dict], list[dict]]:
    """Returns (--model value, volumes, engine volume mounts, init containers)."""
    if "builtin" in model:
        return model["builtin"], [], [], []
    if "pvc" in model:
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": model["pvc"], "readOnly": True}}
        mount = {"name": "model", "mountPath": MODELS_DIR, "readOnly": True}
        return f"{MODELS_DIR}/{model['path']}", [volume], [mount], []
    # A download: an init container fills the folder before the engine starts, so the engine's startup probe
    # only covers loading. Into an emptyDir (once per pod), or into the cache PVC (once per cache).
    folder = model_folder(model, cached=cache_claim is not None)
    if cache_claim:
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": cache_claim}}
    else:
        volume = {"name": "model", "emptyDir": {}}
    mount = {"name": "model", "mountPath": MODELS_DIR}
    download = {
        "name": "download-model",
        "image": image,
        "command": ["python", "-m", "nanoserve.engine_pod.fetch_model", source_uri(model), folder],
        "args": ["--report", REPORT_PATH],
        "env": download_env(model),
        "volumeMounts": [mount, {"name": "cache", "mountPath": "/cache"}, {"name": "tmp", "mountPath": "/tmp"}],
        "terminationMessagePath": REPORT_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",  # a crash before the report: its log's tail
        "securityContext": container_security(),
    }
    engine_mount = {**mount, "readOnly": True} if cache_claim else mount
    return folder, [volume], [engine_mount], [download]
