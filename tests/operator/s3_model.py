"""A small model in moto's S3 (fake_s3.py) and the InferenceService spec that points at it, for the tests of the
rendered S3 download and of the model cache."""

from collections.abc import Iterator
from pathlib import Path

from download_pod import DownloadPod
from fake_s3 import FakeS3

FILES = {
    "config.json": b'{"model_type": "qwen3"}',
    "tokenizer.json": b'{"version": "1.0"}',
    "weights/model.safetensors": b"\x00" * 4096,
}
NEIGHBOUR = {"qwen3/tiny-instruct/config.json": b"{}"}  # shares the prefix's text, not its folder
SECRET = "s3-creds"


def serve_model() -> Iterator[FakeS3]:
    """(As a fixture) moto's S3 with the model in bucket `models` under qwen3/tiny/, signatures checked from
    here on against the key in `.keys`."""
    with FakeS3() as fake:
        fake.keys = fake.access_key("puller")
        fake.put("models", {f"qwen3/tiny/{k}": v for k, v in FILES.items()} | NEIGHBOUR)
        fake.enforce_auth()
        yield fake


def spec(s3: FakeS3, bucket: str = "models", cache: dict | None = None) -> dict:
    source = {"endpoint": s3.url, "bucket": bucket, "path": "qwen3/tiny", "region": "us-east-1"}
    out: dict = {"model": {"s3": {**source, "credentialsSecret": SECRET}}}
    return out | ({"modelCache": cache} if cache else {})


def secrets(key_id: str, secret: str) -> dict[str, str]:
    """The credentials Secret's keys, as the pod's secretKeyRefs resolve them."""
    return {f"{SECRET}/AWS_ACCESS_KEY_ID": key_id, f"{SECRET}/AWS_SECRET_ACCESS_KEY": secret}


def env(p: DownloadPod) -> dict[str, str]:
    # The image's HOME (no ~/.aws of this machine); no instance-metadata lookups beyond 127.0.0.1.
    return {"HOME": p.path("/cache"), "AWS_EC2_METADATA_DISABLED": "true"}


def files_under(folder: Path) -> dict[str, bytes]:
    """The model's files (the download step's own marker left out)."""
    return {
        str(f.relative_to(folder)): f.read_bytes()
        for f in folder.rglob("*")
        if f.is_file() and not f.name.startswith(".nanoserve")
    }
