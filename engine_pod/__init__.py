"""The nanoserve inference engine: `from nanoserve.engine_pod import LLM, SamplingParams`.

Imported lazily, so that torch-free parts under this package (the CLI, the Config that the operator renders
engine flags from, the default model's name) do not pull torch in.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports each on first use
    from nanoserve.engine_pod.errors import ConfigError, InvalidRequestError, ModelLoadError, NanoserveError
    from nanoserve.engine_pod.llm import LLM
    from nanoserve.engine_pod.sampling_params import SamplingParams
    from nanoserve.engine_pod.structured_params import StructuredOutputsParams

_EXPORTS = {
    "LLM": "nanoserve.engine_pod.llm",
    "SamplingParams": "nanoserve.engine_pod.sampling_params",
    "StructuredOutputsParams": "nanoserve.engine_pod.structured_params",
    "NanoserveError": "nanoserve.engine_pod.errors",
    "InvalidRequestError": "nanoserve.engine_pod.errors",
    "ModelLoadError": "nanoserve.engine_pod.errors",
    "ConfigError": "nanoserve.engine_pod.errors",
}
__all__ = [
    "LLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "NanoserveError",
    "InvalidRequestError",
    "ModelLoadError",
    "ConfigError",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
