"""The model cache: download steps of several pods on one cache volume (one folder here, as the PVC would be
in each pod) download a model once. Counted by the downloads moto's S3 served, not by time."""

import json

import pytest
from download_pod import DownloadPod, download_container
from s3_model import FILES, env, files_under, secrets, serve_model, spec

s3 = pytest.fixture(scope="module")(serve_model)

CACHE = {"claimName": "models-cache"}


def cache_pod(s3, root, name: str, volume) -> DownloadPod:
    return DownloadPod(download_container(spec(s3, cache=CACHE)), root / name, {"model": volume})


def test_two_pods_started_at_once_download_once(s3, tmp_path):
    pvc = tmp_path / "pvc"
    pods = [cache_pod(s3, tmp_path, f"pod{i}", pvc) for i in range(2)]
    before = len(s3.object_gets("models"))
    procs = [p.start(secrets(*s3.keys), env(p)) for p in pods]  # both before either waits
    results = [(proc.wait(120), proc.stderr.read() if proc.stderr else "") for proc in procs]
    assert all(code == 0 for code, _ in results), results
    assert len(s3.object_gets("models")) - before == len(FILES)  # one download of each file
    reports = [json.loads(p.report.read_text()) for p in pods]
    assert sorted(r["downloaded"] for r in reports) == [False, True]  # one downloaded, one reused
    assert files_under(pvc / "s3" / "models" / "qwen3" / "tiny") == FILES

    later = cache_pod(s3, tmp_path, "pod2", pvc)  # a pod of a later rollout or scale-up
    code, err = later.run(secrets(*s3.keys), env(later))
    assert code == 0, err
    assert json.loads(later.report.read_text())["downloaded"] is False
    assert len(s3.object_gets("models")) - before == len(FILES)


def test_a_half_download_left_by_a_crashed_pod_is_done_again(s3, tmp_path):
    pvc = tmp_path / "pvc"
    # What a pod killed mid-download leaves: its lock file (the lock itself died with it), a partial folder
    # with a truncated file, no completion marker.
    parent = pvc / "s3" / "models" / "qwen3"
    (parent / ".tiny.partial" / "weights").mkdir(parents=True)
    (parent / ".tiny.partial" / "weights" / "model.safetensors").write_bytes(b"\x00" * 10)
    (parent / ".tiny.lock").touch()
    (parent / "tiny").mkdir()  # and a folder in the model's place with no marker: not trusted either
    (parent / "tiny" / "config.json").write_bytes(b"{")
    p = cache_pod(s3, tmp_path, "pod", pvc)
    before = len(s3.object_gets("models"))
    code, err = p.run(secrets(*s3.keys), env(p))
    assert code == 0, err
    assert json.loads(p.report.read_text())["downloaded"] is True
    assert len(s3.object_gets("models")) - before == len(FILES)
    assert files_under(parent / "tiny") == FILES
    assert not (parent / ".tiny.partial").exists()
