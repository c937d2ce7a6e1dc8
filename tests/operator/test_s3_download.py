"""The S3 download the operator renders, run as the pod would run it (download_pod.py) against moto's S3
server on 127.0.0.1, which checks every request's signature against the access keys it issued."""

import json

import pytest
from download_pod import DownloadPod, download_container, engine_model_path
from fake_s3 import FakeS3
from s3_model import FILES, env, files_under, secrets, serve_model, spec

s3 = pytest.fixture(scope="module")(serve_model)


def test_the_model_lands_where_the_engine_reads_it(s3, tmp_path):
    p = DownloadPod(download_container(spec(s3)), tmp_path)
    before = len(s3.object_gets("models"))
    code, err = p.run(secrets(*s3.keys), env(p))
    assert code == 0, err
    model_dir = tmp_path / "model" / "s3" / "models" / "qwen3" / "tiny"
    assert p.path(engine_model_path(spec(s3))) == str(model_dir)
    assert files_under(model_dir) == FILES
    assert len(s3.object_gets("models")) - before == len(FILES)  # the neighbour prefix stayed put
    report = json.loads(p.report.read_text())
    assert report["source"] == "s3://models/qwen3/tiny" and report["downloaded"] is True
    assert report["bytes"] == sum(len(v) for v in FILES.values())


# What goes wrong, how the keys are wrong (from the right ones), and the error S3 gives.
FAILURES = {
    "unknown key": ("models", lambda key: ("AKIAWRONGWRONGWRONG0", "nope"), "InvalidAccessKeyId"),
    "wrong secret": ("models", lambda key: (key[0], "wrong-secret"), "SignatureDoesNotMatch"),
    "missing bucket": ("no-such-bucket", lambda key: key, "NoSuchBucket"),
}


@pytest.mark.parametrize("bucket,keys,needle", FAILURES.values(), ids=FAILURES.keys())
def test_a_download_that_cannot_work_says_why_and_fails(s3: FakeS3, tmp_path, bucket, keys, needle):
    p = DownloadPod(download_container(spec(s3, bucket)), tmp_path)
    code, err = p.run(secrets(*keys(s3.keys)), env(p))
    assert code != 0 and needle in err and "model download failed" in err, err
    assert needle in json.loads(p.report.read_text())["error"]  # the termination message says it too
    assert not (tmp_path / "model" / "s3" / bucket / "qwen3" / "tiny").exists()
