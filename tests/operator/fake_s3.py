"""moto's S3 (and IAM) in server mode on 127.0.0.1, in a thread: a real HTTP endpoint that boto3 in another
process talks to, checking signatures against the access keys it issued. Every request it serves is recorded
(method, path), so a test counts the downloads it really made."""

import json
import threading
import urllib.request

import boto3
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


class FakeS3:
    def __init__(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        self.served: list[tuple[str, str]] = []
        self.lock = threading.Lock()

        def recording(environ, start_response):
            with self.lock:
                self.served.append((environ["REQUEST_METHOD"], environ["PATH_INFO"]))
            return app(environ, start_response)

        self.server = make_server("127.0.0.1", 0, recording, threaded=True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "FakeS3":
        self.thread.start()
        self._post("/moto-api/reset", "")  # moto's state is process-wide: start from none
        return self

    def __exit__(self, *exc) -> None:
        self._auth_after("inf")  # moto's auth switch is process-wide: leave it off, as found
        self.server.shutdown()
        self.thread.join()

    def client(self, service: str, key: str = "setup", secret: str = "setup"):
        return boto3.client(
            service, endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret
        )

    def access_key(self, user: str) -> tuple[str, str]:
        """An IAM user allowed all of S3, and its access key (id, secret)."""
        iam = self.client("iam")
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(POLICY))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def put(self, bucket: str, objects: dict[str, bytes]) -> None:
        s3 = self.client("s3")
        s3.create_bucket(Bucket=bucket)
        for key, data in objects.items():
            s3.put_object(Bucket=bucket, Key=key, Body=data)

    def enforce_auth(self) -> None:
        """From now on every request must be signed with a key issued by access_key()."""
        self._auth_after("0")

    def _auth_after(self, count: str) -> None:
        self._post("/moto-api/reset-auth", count)

    def _post(self, path: str, body: str) -> None:
        req = urllib.request.Request(f"{self.url}{path}", data=body.encode(), method="POST")
        req.add_header("Content-Type", "text/plain")  # not a form: moto reads the raw body
        urllib.request.urlopen(req, timeout=10).close()

    def object_gets(self, bucket: str) -> list[str]:
        """The object downloads served so far (GETs of a key, not listings)."""
        with self.lock:
            return [
                p for m, p in self.served if m == "GET" and p.startswith(f"/{bucket}/") and len(p) > len(bucket) + 2
            ]
