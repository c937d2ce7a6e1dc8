"""Where the engine finds its model: a builtin, a folder on a PVC, or a Hugging Face download."""

MODELS_DIR = "/models"


def model_summary(model: dict) -> str:
    """One short string for `kubectl get isvc` (the Model column)."""
    if "builtin" in model:
        return model["builtin"]
    if "pvc" in model:
        return f"pvc://{model['pvc']}/{model['path']}"
    return f"hf://{model['name']}"


def served_model_name(spec: dict) -> str:
    """The model's name in the API: spec.servedModelName, else the model as the user gave it (vLLM's rule)."""
    if spec.get("servedModelName"):
        return spec["servedModelName"]
    model = spec["model"]
    return model.get("builtin") or model.get("name") or model["path"]


def hf_token_env(model: dict) -> list[dict]:
    """HF_TOKEN from spec.model.tokenSecret (key `token`): huggingface_hub sends it for gated repos."""
    if not model.get("tokenSecret"):
        return []
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": model["tokenSecret"], "key": "token"}}}]


def model_source(model: dict, image: str) -> tuple[str, list[dict], list[dict], list[dict]]:
    """Returns (--model value, volumes, engine volume mounts, init containers)."""
    if "builtin" in model:
        return model["builtin"], [], [], []
    if "pvc" in model:
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": model["pvc"], "readOnly": True}}
        mount = {"name": "model", "mountPath": MODELS_DIR, "readOnly": True}
        return f"{MODELS_DIR}/{model['path']}", [volume], [mount], []
    # A Hugging Face repo: an init container downloads it once per pod into an emptyDir, so the
    # engine starts from a local folder and its startup probe only covers loading, not the download.
    folder = f"{MODELS_DIR}/{model['name']}"
    volume = {"name": "model", "emptyDir": {}}
    mount = {"name": "model", "mountPath": MODELS_DIR}
    download = {
        "name": "download-model",
        "image": image,
        "command": [
            "python",
            "-c",
            "import sys; from huggingface_hub import snapshot_download; "
            "snapshot_download(repo_id=sys.argv[1], local_dir=sys.argv[2])",
            model["name"],
            folder,
        ],
        "env": [{"name": "HF_HOME", "value": "/cache/huggingface"}] + hf_token_env(model),
        "volumeMounts": [mount, {"name": "cache", "mountPath": "/cache"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    return folder, [volume], [mount], [download]
