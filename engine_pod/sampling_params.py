from dataclasses import dataclass, field

from nanoserve.engine_pod.errors import InvalidRequestError


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. `temperature=0` is greedy."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                 # -1: no top-k
    max_tokens: int = 64
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    priority: int = 0               # lower runs first under the "priority" scheduling policy

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k == 0 or self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 (off) or >= 1, got {self.top_k}", "top_k")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
