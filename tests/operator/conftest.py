import pathlib
import sys

# Helper modules next to the tests (crd_schema, kube_emulator); tests/ has no packages.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
