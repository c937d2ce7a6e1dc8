import pathlib
import sys

import pytest

# Helpers next to these tests, and the operator tests' emulator and harness (tests/ has no packages).
HERE = pathlib.Path(__file__).parent
for folder in (HERE, HERE.parent / "operator"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from chart_install import MODES, installed_chart  # noqa: E402
from helm_tool import Helm, helm_binary  # noqa: E402


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Helm:
    """The real helm v4.3.1, which `make setup` installs into the venv (tests/helm/helm_tool.py)."""
    return Helm(helm_binary(), tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session", params=MODES, ids=MODES)
def installed(request, tmp_path_factory):
    """The chart installed and the operator run once per mode (cluster-wide, namespaced)."""
    values, isvcs, unserved = MODES[request.param]
    namespaces = [*isvcs, *unserved]
    with installed_chart(tmp_path_factory.mktemp(request.param), values, namespaces, isvcs, unserved) as inst:
        yield inst
