"""`--speculative-config`: vLLM's JSON object for speculative decoding, of which nanoserve implements the
n-gram (prompt lookup) method. Parsed once into a SpeculativeConfig; a bad value is a ConfigError naming the
field, as vLLM's pydantic config would refuse it."""

import json
from dataclasses import dataclass

from nanoserve.engine_pod.errors import ConfigError

_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size")
_DEFAULT_LOOKUP = 5  # vLLM's, when neither prompt_lookup_max nor prompt_lookup_min is given


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # "ngram"
    num_speculative_tokens: int  # K: the most draft tokens a sequence verifies in one step
    prompt_lookup_max: int  # the longest suffix n-gram looked up
    prompt_lookup_min: int  # the shortest one
    # A step with more running sequences than this proposes no drafts (None: always may): at large batches
    # a verify step (eager, not overlapped) costs more than the tokens it saves.
    disable_by_batch_size: int | None = None

    def drafts_at(self, num_running: int) -> bool:
        """Whether a step that starts with `num_running` running sequences may propose drafts."""
        return self.disable_by_batch_size is None or num_running <= self.disable_by_batch_size


def parse_speculative_config(value: str | dict | None) -> SpeculativeConfig | None:
    """The flag's JSON text (or the dict LLM(..., speculative_config=...) takes) as a SpeculativeConfig;
    None or an empty value: no speculative decoding."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"speculative_config is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"speculative_config must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(_KEYS))
    if unknown:
        raise ConfigError(f"speculative_config has unknown field(s) {', '.join(unknown)} (nanoserve takes {_KEYS})")
    method = value.get("method")
    if method != "ngram":
        raise ConfigError(
            f"speculative_config.method must be 'ngram' (the method nanoserve implements), got {method!r}"
        )
    k = _int(value, "num_speculative_tokens", required=True)
    hi, lo = _int(value, "prompt_lookup_max"), _int(value, "prompt_lookup_min")
    if hi is None and lo is None:  # vLLM's defaults: a missing bound takes the other's value
        hi = lo = _DEFAULT_LOOKUP
    hi = lo if hi is None else hi
    lo = hi if lo is None else lo
    assert k is not None and hi is not None and lo is not None
    if lo > hi:
        raise ConfigError(f"speculative_config.prompt_lookup_min ({lo}) must be <= prompt_lookup_max ({hi})")
    return SpeculativeConfig("ngram", k, hi, lo, _int(value, "disable_by_batch_size"))


def _int(value: dict, key: str, required: bool = False) -> int | None:
    v = value.get(key)
    if v is None:
        if required:
            raise ConfigError(f"speculative_config.{key} is required for method 'ngram'")
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"speculative_config.{key} must be an integer >= 1, got {v!r}")
    return v
