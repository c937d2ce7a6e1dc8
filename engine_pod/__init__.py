"""The nanoserve inference engine: `from nanoserve.engine_pod import LLM, SamplingParams`."""
from nanoserve.engine_pod.errors import ConfigError, InvalidRequestError, ModelLoadError, NanoserveError
from nanoserve.engine_pod.llm import LLM
from nanoserve.engine_pod.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "NanoserveError", "InvalidRequestError", "ModelLoadError", "ConfigError"]
