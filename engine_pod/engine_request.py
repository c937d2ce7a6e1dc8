"""A request as the server tracks it while the engine core runs it, and the TokenDeltas it hands to its
response: streamed as they come, or held and sent once at the end (no loop work per token)."""

import asyncio
from dataclasses import dataclass, field


@dataclass
class TokenDelta:
    token_ids: list[int]
    finish_reason: str | None  # None while the request runs
    num_cached_tokens: int = 0
    logprobs: list | None = None  # with params.logprobs: a token_logprobs.TokenLogprobs per token
    prompt_logprobs: list | None = None  # with params.prompt_logprobs, in the first delta: one per prompt token
    # from the second

    def then(self, more: "TokenDelta") -> "TokenDelta":
        """This delta followed by `more`, as one (tokens that arrived while the response was busy)."""
        logprobs = (
            None if self.logprobs is None and more.logprobs is None else (self.logprobs or []) + (more.logprobs or [])
        )
        return TokenDelta(
            self.token_ids + more.token_ids, more.finish_reason, more.num_cached_tokens, logprobs, self.prompt_logprobs
        )


@dataclass(eq=False)
class EngineRequest:
    """One request as the server tracks it while the engine core runs it."""

    seq_id: int
    num_prompt_tokens: int
    arrival: float
    stream: bool  # False: the tokens come in one delta at the end
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    held: list[int] = field(default_factory=list)  # a non-streamed request's tokens so far
    held_logprobs: list | None = None  # ... and their logprobs, when asked
    prompt_logprobs: list | None = None
    admitted: asyncio.Future | None = None  # a constrained request: set once its grammar has compiled
    finished: bool = False
    scheduled_at: float | None = None  # first scheduled (the metrics of a request's phases)
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_generated: int = 0

    def deliver(self, token: int | None, finish: str | None, cached: int, logprobs) -> None:
        """A step's outcome for this request: its new token (None: it ended without one), why it finished
        (None: it goes on), its prompt's cached tokens, and the token's logprobs when asked."""
        if token is not None:
            self.num_generated += 1
        if self.stream:
            if token is not None:
                first = self.num_generated == 1
                self.out.put_nowait(
                    TokenDelta(
                        [token],
                        finish,
                        cached,
                        None if logprobs is None else [logprobs],
                        self.prompt_logprobs if first else None,
                    )
                )
            else:
                self.out.put_nowait(TokenDelta([], finish, cached))
        elif token is not None:
            self.held.append(token)
            if logprobs is not None:
                if self.held_logprobs is None:
                    self.held_logprobs = []
                self.held_logprobs.append(logprobs)
        if finish is not None:
            if not self.stream:
                self.out.put_nowait(TokenDelta(self.held, finish, cached, self.held_logprobs, self.prompt_logprobs))
            self.finished = True
