"""Pure: status.modelLoad and failed downloads, from engine pods' status as the kubelet writes it."""

import json

from nanoserve.operator.model_status import model_load, status_patch

S3 = {"s3": {"bucket": "models", "path": "qwen3/tiny"}}
REPORT = {"source": "s3://models/qwen3/tiny", "downloaded": False, "bytes": 4137, "seconds": 0.25}


def pod(name: str, created: str, download: dict | None = None, ready_at: str | None = None, **init) -> dict:
    status: dict = {
        "containerStatuses": [{"name": "engine", "state": {"running": {"startedAt": "2026-12-02T10:00:05Z"}}}],
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": ready_at}] if ready_at else [],
    }
    if download is not None or init:
        status["initContainerStatuses"] = [{"name": "download-model", **init}]
        if download is not None:
            status["initContainerStatuses"][0]["state"] = {"terminated": download}
    return {"metadata": {"name": name, "creationTimestamp": created}, "status": status}


def done(report: dict) -> dict:
    return {"exitCode": 0, "message": json.dumps(report), "finishedAt": "2026-12-02T10:00:04Z"}


def test_the_newest_pod_that_loaded_its_model_is_reported():
    old = pod("e-old", "2026-12-02T09:00:00Z", done({**REPORT, "downloaded": True, "seconds": 42.5}))
    new = pod("e-new", "2026-12-02T10:00:00Z", done(REPORT), ready_at="2026-12-02T10:01:15Z")
    load, failed = model_load(S3, [new, old])
    assert failed == []
    assert load == {
        "pod": "e-new",
        "source": "s3://models/qwen3/tiny",
        "downloaded": False,  # found in the cache
        "bytes": 4137,
        "downloadSeconds": 0.25,
        "readySeconds": 70,  # 10:00:05 -> 10:01:15
    }


def test_a_failed_download_is_a_failure_with_its_message():
    crashed = {"exitCode": 1, "message": "model download failed: S3Error: NoSuchBucket"}
    waiting = pod("e-1", "2026-12-02T10:00:00Z", lastState={"terminated": crashed}, state={"waiting": {}})
    load, failed = model_load(S3, [waiting])
    assert load is None
    assert failed == [("ModelDownloadFailed", "e-1: model download failed: S3Error: NoSuchBucket")]


def test_nothing_is_reported_before_anything_was_measured():
    running = pod("e-1", "2026-12-02T10:00:00Z", state={"running": {}})  # still downloading
    assert model_load(S3, [running]) == (None, [])
    assert model_load(S3, []) == (None, [])


def test_a_builtin_model_reports_its_start_to_ready_only():
    ready = pod("e-1", "2026-12-02T10:00:00Z", ready_at="2026-12-02T10:00:35Z")
    load, _ = model_load({"builtin": "smollm2-135m"}, [ready])
    assert load == {"pod": "e-1", "source": "smollm2-135m", "readySeconds": 30}


def test_the_status_patch_clears_what_is_no_longer_measured():
    # A merge patch: null removes an older pod's download fields, or the whole record when no pod has one.
    load, _ = model_load({"builtin": "smollm2-135m"}, [pod("e-1", "t", ready_at="2026-12-02T10:00:35Z")])
    patch = status_patch(load)["modelLoad"]
    assert patch["downloaded"] is None and patch["bytes"] is None and patch["readySeconds"] == 30
    assert status_patch(None) == {"modelLoad": None}
