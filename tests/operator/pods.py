"""Runs what the operator rendered as local processes, the way a kubelet would run the pod.

A `Pod` takes a rendered Deployment and starts its container: the image's ENV (from its Dockerfile), then
the container's env, the container's command and args, each volume mount as a folder of its own (paths in
args and env follow the mount), the image's WORKDIR as the working directory, and a loopback address as
the pod's IP. Only the listening port is changed: the pods share this machine's port space, so each takes
a port held for it (tests/procs.py), and its EndpointSlice says which (`endpoint_slice`). As in the gateway
image, a gateway pod finds no torch; pods get the tests' OpenMP thread count (they share this machine's
cores).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from dockerfile_parse import instructions
from op_harness import REPO
from procs import reserve_port, wait_http

BIN = Path(sys.executable).parent  # the image's /opt/venv/bin: console scripts beside this python
DOCKERFILES = {"engine": REPO / "docker" / "engine.Dockerfile", "gateway": REPO / "docker" / "gateway.Dockerfile"}
NO_TORCH = Path(__file__).with_name("no_torch")  # a sitecustomize that hides torch, absent from the gateway image


def image_config(dockerfile: Path) -> tuple[dict[str, str], str]:
    """ENV and WORKDIR of the final stage (PATH left out: the venv's bin comes first anyway)."""
    ins = instructions(dockerfile)
    final = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    env, workdir = {}, "/"
    for op, value in ins[final:]:
        if op == "ENV":
            env.update(kv.split("=", 1) for kv in shlex.split(value))
        elif op == "WORKDIR":
            workdir = value
    env.pop("PATH", None)
    return env, workdir


class Pod:
    """One replica of a rendered Deployment, running here. `.url` once started."""

    def __init__(self, deployment: dict, ip: str, root: Path, env: dict[str, str] | None = None) -> None:
        spec = deployment["spec"]["template"]["spec"]
        (self.container,) = spec["containers"]
        self.component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        self.ip, self.port = ip, reserve_port(ip)
        self.url = f"http://{ip}:{self.port}"
        self.grace = spec.get("terminationGracePeriodSeconds", 30)
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.mounts = {m["mountPath"]: root / m["name"] for m in self.container.get("volumeMounts", [])}
        for folder in self.mounts.values():
            folder.mkdir(exist_ok=True)
        self.extra_env = env or {}
        self.image_env, self.workdir = image_config(DOCKERFILES[self.component])
        self.proc: subprocess.Popen | None = None
        self.log = root / "log.txt"

    def path(self, container_path: str) -> str:
        """Where a path inside the container is on this machine (through its volume mount)."""
        for mount, folder in sorted(self.mounts.items(), key=lambda m: -len(m[0])):
            if container_path == mount or container_path.startswith(mount.rstrip("/") + "/"):
                return str(folder) + container_path[len(mount.rstrip("/")) :]
        return container_path

    def argv(self) -> list[str]:
        c = self.container
        argv = [self.path(a) for a in c["command"] + c.get("args", [])]
        argv[0] = str(BIN / argv[0])  # the image's PATH
        for flag, value in (("--host", self.ip), ("--port", str(self.port))):  # the pod's own address
            if flag in argv:
                argv[argv.index(flag) + 1] = value
            else:  # listening on every address of the pod (0.0.0.0) is listening on its IP
                argv += [flag, value]
        return argv

    def environment(self) -> dict[str, str]:
        env = {"PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONSAFEPATH": "1", **self.image_env}
        if "OMP_NUM_THREADS" in os.environ:  # the pods share this machine's cores (tests/conftest.py)
            env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
        if self.component == "gateway":
            env["PYTHONPATH"] = str(NO_TORCH)
        for var in self.container.get("env", []):
            if "value" not in var:
                raise NotImplementedError(f"env {var['name']} comes from {list(var)}: give it in `env`")
            env[var["name"]] = var["value"]
        env = {k: self.path(v) for k, v in env.items()}
        return {**env, **self.extra_env}

    def start(self) -> Pod:
        cwd = Path(self.path(self.workdir))
        cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv(), env=self.environment(), cwd=cwd, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        path = self.container["readinessProbe"]["httpGet"]["path"]
        try:
            wait_http(self.url + path, timeout, self.proc)
        except (TimeoutError, RuntimeError) as e:
            raise AssertionError(f"{self.component} pod {self.ip}: {e}\n{self.log.read_text()[-4000:]}") from None

    def terminate(self) -> int:
        """What the kubelet does after preStop: SIGTERM, then SIGKILL past the grace period. The exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(self.grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def endpoint_slice(service: str, pod: Pod) -> dict:
    """The EndpointSlice the endpoints controller would publish for one ready pod of `service`."""
    (port,) = pod.container["ports"]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-{pod.ip.replace('.', '-')}",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [pod.ip], "conditions": {"ready": True, "serving": True}}],
        "ports": [{"name": port["name"], "port": pod.port, "protocol": "TCP"}],
    }
