import dataclasses
import math
from dataclasses import dataclass, field

from nanoserve.engine_pod.errors import InvalidRequestError
from nanoserve.engine_pod.structured_params import StructuredOutputsParams

_INT32_MAX = 2**31 - 1
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
MAX_N = 128  # n and best_of: each completion is a sequence of its own (a billion would never end)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(value, low: int, name: str) -> None:
    if not _is_int(value) or value < low:
        raise InvalidRequestError(f"{name} must be an integer >= {low}, got {value!r}", name)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. `temperature=0` is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    max_tokens: int = 16  # vLLM's default
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)  # a single string or None is taken too
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    priority: int = 0  # lower runs first under the "priority" scheduling policy
    cache_salt: str | None = None  # prefix-cache blocks are shared only among requests with the same salt
    structured_outputs: StructuredOutputsParams | None = None  # the text must match this (vLLM's name)
    # Logits processing, in vLLM's order: allowed ids / bad words / min_tokens / logit bias, then penalties
    # (presence and frequency over the output, repetition over prompt and output), temperature, min_p, top-k/p.
    n: int = 1  # completions of the prompt, each its own sequence sharing the prompt's blocks
    best_of: int | None = None  # completions generated, the n with the highest mean logprob returned
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0  # EOS and stop_token_ids are masked (and stop strings unchecked) until then
    logit_bias: dict[int, float] | None = None  # added to the logits, clamped to [-100, 100] as in vLLM
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None  # never completed (their last token is masked after the rest)
    logprobs: int | None = None  # the sampled token's logprob and this many top ones (raw: before processing)
    prompt_logprobs: int | None = None  # each prompt token's logprob (from the second) and this many top ones
    skip_special_tokens: bool = True  # in the text (the token ids keep them)
    include_stop_str_in_output: bool = False  # a stop string that ends the text is kept in it

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0, got {self.temperature}", "temperature"
            )
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
        self._check_processing()
        # Whether the sampler needs more than temperature and top-k/top-p for this request: the common case
        # skips a pass over the batch's rows each step.
        self.extras = bool(
            self.logit_bias
            or self.min_tokens
            or self.bad_words
            or self.allowed_token_ids is not None
            or self.penalized
            or self.min_p > 0
            or self.logprobs is not None
        )

    def _check_processing(self) -> None:
        _int_at_least(self.n, 1, "n")
        if self.best_of is not None:
            _int_at_least(self.best_of, self.n, "best_of")
        for name in ("n", "best_of"):
            if (getattr(self, name) or 0) > MAX_N:
                raise InvalidRequestError(f"{name} must be <= {MAX_N}, got {getattr(self, name)}", name)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value}", name)
        if not 0 < self.repetition_penalty <= 1e4:  # (NaN fails these too)
            raise InvalidRequestError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty"
            )
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        _int_at_least(self.min_tokens, 0, "min_tokens")
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})", "min_tokens"
            )
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise InvalidRequestError("logit_bias must map token ids to numbers", "logit_bias")
            try:
                self.logit_bias = {int(k): min(100.0, max(-100.0, float(v))) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise InvalidRequestError("logit_bias must map token ids to numbers", "logit_bias") from None
            if any(math.isnan(v) for v in self.logit_bias.values()):
                raise InvalidRequestError("logit_bias values must be numbers", "logit_bias")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids or not all(_is_int(t) for t in self.allowed_token_ids):
                raise InvalidRequestError(
                    "allowed_token_ids must be a non-empty list of token ids", "allowed_token_ids"
                )
        if self.bad_words is not None and not all(isinstance(w, str) for w in self.bad_words):
            raise InvalidRequestError("bad_words must be a list of strings", "bad_words")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _int_at_least(value, 0, name)
                if value > MAX_LOGPROBS:
                    raise InvalidRequestError(f"{name} must be <= {MAX_LOGPROBS}, got {value}", name)

    def token_ids_to_check(self) -> dict[str, list[int]]:
        """The token ids this request names, by field (admission checks them against the vocabulary)."""
        return {
            "logit_bias": list(self.logit_bias or ()),
            "allowed_token_ids": list(self.allowed_token_ids or ()),
            "stop_token_ids": self.stop_token_ids,
        }

    def child(self, j: int) -> "SamplingParams":
        """The j-th request of a prompt's n (or best_of): a seeded request's j-th child is seeded `seed + j`
        (vLLM's rule), so its n completions equal n requests seeded seed, seed + 1, ... best_of ranks by logprob:
        it asks for the sampled token's (logprobs=0) when the client did not."""
        logprobs = self.logprobs if self.best_of is None or self.logprobs is not None else 0
        return dataclasses.replace(
            self, n=1, best_of=None, logprobs=logprobs, seed=None if self.seed is None else self.seed + j
        )

    @property
    def ranks_best_of(self) -> bool:
        return self.best_of is not None and self.best_of > self.n

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def best_of(mean_logprobs: list[float], n: int) -> list[int]:
    """best_of: the indices of the n completions with the highest logprob per token (OpenAI's rule), best first."""
    return sorted(range(len(mean_logprobs)), key=lambda i: mean_logprobs[i], reverse=True)[:n]
