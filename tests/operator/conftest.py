import os
import pathlib
import sys

import pytest

# Helper modules next to the tests (op_harness, crd_schema, kube_emulator); tests/ has no packages.
sys.path.insert(0, str(pathlib.Path(__file__).parent))

from emulator_thread import EmulatorThread  # noqa: E402
from op_harness import NAMESPACE, REPO, Kubectl, Operator  # noqa: E402


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """The emulated API server with the CRD and the test namespace in it."""
    with EmulatorThread() as em:
        em.env = {
            **os.environ,
            "KUBECONFIG": em.kubeconfig(tmp_path_factory.mktemp("kube") / "config"),
            "PYTHONSAFEPATH": "1",
        }
        kubectl = Kubectl(em.env)
        kubectl("apply", "--validate=false", "-f", str(REPO / "crds" / "inferenceservice.yaml"))
        kubectl("wait", "--for=condition=Established", "crd/inferenceservices.serving.nanoserve.io")
        for ns in (NAMESPACE, "restart", "downtime"):
            kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        yield em


@pytest.fixture(scope="session")
def kubectl(cluster) -> Kubectl:
    return Kubectl(cluster.env)


@pytest.fixture(scope="session")
def operator(cluster, tmp_path_factory):
    op = Operator(cluster.env, NAMESPACE, tmp_path_factory.mktemp("operator") / "kopf.log").start()
    yield op
    op.stop()
