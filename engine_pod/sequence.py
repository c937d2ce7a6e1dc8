from enum import Enum, auto
from itertools import count
from typing import TYPE_CHECKING

import numpy as np

from nanoserve.common.block_hash import salt_root
from nanoserve.engine_pod.sampling_params import SamplingParams

if TYPE_CHECKING:
    import xgrammar

    from nanoserve.engine_pod.grammar_process import GrammarHandle
    from nanoserve.engine_pod.spec_decode import TokenMirror

PLACEHOLDER = -1  # a sampled token still on the GPU (overlapped scheduling): its id is not known yet


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: its tokens, how many of them have KV in the cache, and the blocks holding that KV.

    Prefill and decode are the same thing here: each step computes `num_tokens - num_computed_tokens`
    tokens (or a chunk of them); a decode step is simply one token.
    """

    _ids = count()

    def __init__(self, token_ids: list[int], params: SamplingParams, arrival: float = 0.0, seq_id: int | None = None):
        self.seq_id = next(Sequence._ids) if seq_id is None else seq_id  # the server numbers its own requests
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (prefix hits included)
        self.num_cached_tokens = 0  # of those, tokens found in the prefix cache at admission
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks registered so far
        self.hash_root = salt_root(params.cache_salt)  # block 0's hash parent: None unless salted
        self.params = params
        self.arrival = arrival
        self.finish_reason: str | None = None  # "stop", "length" or "abort"
        self.num_preemptions = 0
        self.num_pending = 0  # trailing PLACEHOLDER tokens (sampled, not yet copied back)
        self.pending_row = -1  # row of the newest placeholder in its step's sampled tokens
        # structured output: accepted every completion token (the matcher, or in the grammar process its handle)
        self.grammar: xgrammar.GrammarMatcher | GrammarHandle | None = None
        self.bad_words_ids: list[list[int]] = []  # params.bad_words as token sequences (the engine tokenizes them)
        self.logprobs: list = []  # with params.logprobs: one token_logprobs.TokenLogprobs per completion token
        self.prompt_logprobs: list = []  # with params.prompt_logprobs: one per prompt token from the second on
        self.draft_ids: list[int] = []  # speculative decoding: this step's draft tokens, verified after the last one
        self.draft_basis: list[int] = []  # ... the tokens it assumed for the step in flight's placeholders
        self.flight_draft: list[int] = []  # the draft of the step that made the placeholders (while num_pending)
        self.flight_basis: list[int] = []  # ... and its draft_basis
        self.token_mirror: TokenMirror | None = None  # spec_decode.TokenMirror of token_ids, made by the first lookup
        self._prompt_unique: np.ndarray | None = None
        self._table_array: tuple[list[int], np.ndarray] | None = None  # (the list it mirrors, its ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def prompt_unique(self) -> np.ndarray:
        """The prompt's distinct token ids (the repetition penalty's), computed once."""
        if self._prompt_unique is None:
            self._prompt_unique = np.unique(np.asarray(self.token_ids[: self.num_prompt_tokens], np.int64))
        return self._prompt_unique

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def block_table_array(self) -> np.ndarray:
        """`block_table` as int64 numpy, rebuilt only when it changed: the block manager only appends to
        a table or replaces the list, so the same list at the same length holds the same ids."""
        cached = self._table_array
        if cached is None or cached[0] is not self.block_table or len(cached[1]) != len(self.block_table):
            cached = self._table_array = (self.block_table, np.array(self.block_table, np.int64))
        return cached[1]
