"""The engine pod's download init container, as rendered, run here as a real process the way a kubelet would:
its own command and args, its env (secret references resolved from a dict, as the Secret would give them),
each volume mount as a local folder (pods that share a volume get the same folder) and its termination
message file under the test's folder."""

import os
import subprocess
import sys
from pathlib import Path

from crd_schema import default_spec

from nanoserve.operator.render import render


def download_container(spec: dict, name: str = "demo") -> dict:
    deploy = next(o for o in render(name, "ml", default_spec(spec)) if o["kind"] == "Deployment")
    (init,) = deploy["spec"]["template"]["spec"]["initContainers"]
    return init


def engine_model_path(spec: dict, name: str = "demo") -> str:
    """The --model argument of the rendered engine: the folder it loads from (inside its pod)."""
    deploy = next(o for o in render(name, "ml", default_spec(spec)) if o["kind"] == "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    return args[args.index("--model") + 1]


class DownloadPod:
    """One pod's download step: `volumes` maps volume names to local folders; the rest go under `root`."""

    def __init__(self, init: dict, root: Path, volumes: dict[str, Path] | None = None) -> None:
        self.init, self.root = init, root
        self.folders = {m["name"]: (volumes or {}).get(m["name"], root / m["name"]) for m in init["volumeMounts"]}
        self.mounts = {m["mountPath"]: self.folders[m["name"]] for m in init["volumeMounts"]}
        for folder in self.folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.report = root / "termination-log"

    def path(self, container_path: str) -> str:
        """Where a path inside the container is here (through its volume mount, or the termination message)."""
        if container_path == self.init["terminationMessagePath"]:
            return str(self.report)
        for mount, folder in sorted(self.mounts.items(), key=lambda m: -len(m[0])):
            if container_path == mount or container_path.startswith(mount + "/"):
                return str(folder) + container_path[len(mount) :]
        return container_path

    def env(self, secrets: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
        env = {"PATH": os.environ["PATH"], "PYTHONSAFEPATH": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        for e in self.init["env"]:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            env[e["name"]] = secrets[f"{ref['name']}/{ref['key']}"] if ref else self.path(e["value"])
        return {**env, **extra}

    def argv(self) -> list[str]:
        command = self.init["command"] + self.init.get("args", [])
        return [sys.executable if command[0] == "python" else command[0], *[self.path(a) for a in command[1:]]]

    def start(self, secrets: dict[str, str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        self.root.mkdir(parents=True, exist_ok=True)
        env = self.env(secrets, extra_env or {})
        return subprocess.Popen(self.argv(), env=env, stderr=subprocess.PIPE, text=True, cwd=self.root)

    def run(self, secrets: dict[str, str], extra_env: dict[str, str] | None = None) -> tuple[int, str]:
        proc = self.start(secrets, extra_env)
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err
