import math
from dataclasses import dataclass, field

from nanoserve.engine_pod.errors import InvalidRequestError
from nanoserve.engine_pod.structured_params import StructuredOutputsParams


_INT32_MAX = 2**31 - 1


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. `temperature=0` is greedy."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                 # -1 or 0: no top-k
    max_tokens: int = 64
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    priority: int = 0               # lower runs first under the "priority" scheduling policy
    cache_salt: str | None = None   # prefix-cache blocks are shared only among requests with the same salt
    structured_outputs: StructuredOutputsParams | None = None  # the text must match this (vLLM's name)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature}",
                                      "temperature")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k}", "top_k")
        if self.top_k == 0 or self.top_k > _INT32_MAX:  # 0: off, as in vLLM; more than any vocabulary: off too
            self.top_k = -1
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            raise InvalidRequestError(f"cache_salt must be a non-empty string, got {self.cache_salt!r}", "cache_salt")
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise InvalidRequestError(f"structured_outputs: {e}", "structured_outputs") from None
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise InvalidRequestError("structured_outputs must be a StructuredOutputsParams", "structured_outputs")
        if self.seed is not None:
            self.seed %= 1 << 63  # any integer seeds; the sampler keeps seeds in int64

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
