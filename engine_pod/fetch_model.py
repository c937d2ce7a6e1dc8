"""The engine pod's model download step (its init container): a Hugging Face repo or an S3 prefix into a folder.

    python -m nanoserve.engine_pod.fetch_model hf://org/name /models/org/name [--report /dev/termination-log]
    python -m nanoserve.engine_pod.fetch_model s3://bucket/prefix /models/s3/bucket/prefix

The folder may be on a shared cache volume: cache_fill makes sure one pod downloads and the others reuse it.
--report writes what happened as JSON to the container's termination message, where the operator reads it
into the InferenceService's status (the kubelet keeps it in the pod's status, up to 4 KiB).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from nanoserve.engine_pod.cache_fill import fill_once


def fetch_hf(repo: str, dest: Path) -> None:
    from huggingface_hub import snapshot_download  # HF_TOKEN and HF_ENDPOINT come from the environment

    snapshot_download(repo_id=repo, local_dir=dest)


def fetch_s3(location: str, dest: Path) -> None:
    from nanoserve.engine_pod.s3_fetch import fetch_prefix

    bucket, _, prefix = location.partition("/")
    fetch_prefix(bucket, prefix, dest)


FETCHERS = {"hf": fetch_hf, "s3": fetch_s3}


def fetch(source: str, dest: Path) -> dict:
    """Fills dest from source (once); returns the report: source, downloaded (by this call), bytes, seconds."""
    scheme, sep, location = source.partition("://")
    if not sep or scheme not in FETCHERS or not location:
        raise ValueError(f"unknown model source {source!r}: expected hf://org/name or s3://bucket/prefix")
    start = time.monotonic()
    marker = fill_once(dest, source, lambda folder: FETCHERS[scheme](location, folder))
    # seconds: this pod's own wait (lock, download or neither), measured here; a reuse reports its short wait.
    return {
        "source": source,
        "downloaded": marker["downloaded"],
        "bytes": marker["bytes"],
        "seconds": round(time.monotonic() - start, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fetch_model", description="Download a model into the folder the engine reads."
    )
    parser.add_argument("source", help="hf://org/name or s3://bucket/prefix")
    parser.add_argument("dest", type=Path, help="the model folder the engine reads")
    parser.add_argument("--report", type=Path, help="write the outcome as JSON here (the termination message)")
    args = parser.parse_args(argv)
    try:
        report = fetch(args.source, args.dest)
    except Exception as e:  # noqa: BLE001 - one clear line (the termination message) instead of a traceback
        print(f"model download failed: {type(e).__name__}: {e}", file=sys.stderr)
        if args.report:
            args.report.write_text(json.dumps({"source": args.source, "error": str(e)[:3000]}))
        return 1
    print(json.dumps(report))
    if args.report:
        args.report.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
