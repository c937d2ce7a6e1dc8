"""Download every object under an S3 prefix (AWS, MinIO or any S3 endpoint) into a local folder.

boto3 takes its whole configuration from the standard environment, as the operator renders it:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (from the credentials Secret; absent for IRSA, pod identity or an
instance role, which boto3's credential chain finds itself), AWS_REGION and AWS_ENDPOINT_URL_S3.
"""

import os
from pathlib import Path, PurePosixPath

import boto3
import botocore.config
import botocore.exceptions


class S3Error(Exception):
    """A download that no retry will fix: say what to change."""


def fetch_prefix(bucket: str, prefix: str, dest: Path) -> int:
    """Downloads s3://bucket/prefix/** to dest/** (keys relative to the prefix). Returns the object count."""
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    # MinIO, Ceph and most S3 servers besides AWS's serve buckets by path, not as a host name under theirs.
    custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = botocore.config.Config(s3={"addressing_style": "path"}) if custom else None
    s3 = boto3.client("s3", config=config)
    count = 0
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = PurePosixPath(obj["Key"][len(prefix) :].lstrip("/"))  # "a//b" must not reach /b
                if obj["Key"].endswith("/") or ".." in rel.parts:  # folder placeholders; keys escaping dest
                    continue
                target = dest.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(target))  # multipart and parallel for big files
                count += 1
    except botocore.exceptions.ClientError as e:
        err = e.response.get("Error", {})
        raise S3Error(f"s3://{bucket}/{prefix}: {err.get('Code', '?')}: {err.get('Message', e)}") from e
    except botocore.exceptions.BotoCoreError as e:  # no credentials, endpoint unreachable, ...
        raise S3Error(f"s3://{bucket}/{prefix}: {e}") from e
    if not count:
        raise S3Error(f"s3://{bucket}/{prefix}: no objects under this prefix")
    return count
