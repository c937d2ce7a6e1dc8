"""Processes that only tokenize and serve HTTP (the engine's API server, the gateway) keep torch out.

transformers imports torch when it can, for a tokenizer too: ~1 s of CPU and ~250 MB on a CPU wheel, and
on a GPU machine's CUDA build over 10 s of CPU, holding the GIL while the event loop serves requests.
"""

import os
import sys


def keep_torch_out() -> None:
    """Make `import torch` fail in this process (transformers then works without it). A no-op once torch is
    imported: an in-process server (tests, `LLM` users) shares its host's modules."""
    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  (an import of it now fails)
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # (its "PyTorch was not found")
