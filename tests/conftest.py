"""Fixtures shared by every suite: tiny random Hugging Face models built on the spot, with fixed seeds."""

import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # helper modules beside the suites (procs.py)
import prelaunch  # noqa: E402
import procs  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

REPO = pathlib.Path(__file__).parent.parent
PACKAGE_DIRS = {"": "nanoserve_pkg", "engine_pod": "engine_pod", "kernels": "kernels", "common": "common"}
PACKAGE_DIRS |= {"gateway": "gateway", "operator": "operator"}  # nanoserve.<key> is the repo's <folder>


def _relink_if_stale() -> None:
    """A module added or removed since the last `make setup` is missing from (or dangling in) the strict
    editable install's link tree under build/: link it again (a second or two) before anything imports."""
    import nanoserve

    tree = pathlib.Path(nanoserve.__file__).parent
    if REPO / "build" not in tree.parents:
        return  # not this checkout's link tree (the GPU machine links the folders itself, bench/gpu_all.sh)
    linked = {q.relative_to(tree).as_posix() for q in tree.rglob("*.py")}
    present = {
        (f"{key}/" if key else "") + q.relative_to(REPO / folder).as_posix()
        for key, folder in PACKAGE_DIRS.items()
        for q in (REPO / folder).rglob("*.py")
        if "__pycache__" not in q.parts
    }
    if linked != present:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)]
        subprocess.run([*cmd, "--config-settings", "editable_mode=strict"], check=True, capture_output=True)


_relink_if_stale()

# One OpenMP thread per process, inherited by every engine a test starts. The suite runs several processes
# at once on few cores, and a two-thread OpenMP region stalls whenever another process holds the other core:
# tiny-model steps then take 5x longer. On these models a second thread gains nothing anyway.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported before this file (by a plugin): too late for the variable
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """One tiny model folder per supported architecture. qwen2 has an odd vocabulary (padding under TP)
    and biases; llama has tied embeddings."""
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": build_tiny_model(str(root / "llama"), "llama", tie_word_embeddings=True),
        "qwen2": build_tiny_model(str(root / "qwen2"), "qwen2", vocab_size=251, tie_word_embeddings=False),
        "qwen3": build_tiny_model(str(root / "qwen3"), "qwen3", tie_word_embeddings=False),
    }


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from nanoserve.engine_pod.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def bpe_model(tmp_path_factory) -> str:
    """A tiny random qwen3 with a byte-level BPE tokenizer (tests/bpe_model.py): it can spell JSON."""
    from bpe_model import save_bpe_model

    return save_bpe_model(str(tmp_path_factory.mktemp("models") / "bpe"))


# Servers and engines started ahead of the tests that need them (tests/prelaunch.py).
def pytest_collection_finish(session):
    prelaunch.schedule(session.items)


@pytest.fixture(scope="session", autouse=True)
def _prelaunch_first(request):
    """Before the session's first fixtures (autouse ones set up first): what its first tests need."""
    prelaunch.ahead(request.node, request.getfixturevalue)


@pytest.fixture(autouse=True)
def _prelaunch_ahead(request):
    prelaunch.ahead(request.node, request.getfixturevalue)


def pytest_sessionfinish(session):
    prelaunch.stop_all()
    procs.reap()
    procs.release_ports()
