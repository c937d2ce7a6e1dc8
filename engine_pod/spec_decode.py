"""N-gram (prompt lookup) speculative decoding: the proposer, which requests may speculate, and the counts.

Each decode step a running sequence's last N..M tokens are looked up earlier in its own prompt and output;
the tokens that followed the longest match (the most recent one among equally long matches) are its draft.
The step verifies the drafts (spec_verify.py) and the scheduler rolls back the KV of rejected ones.
"""

from dataclasses import dataclass, field

import numpy as np

from nanoserve.engine_pod.sequence import Sequence


def propose_ngram(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to `k` tokens following an earlier occurrence of the longest suffix of `tokens` of length `max_n`
    down to `min_n`; [] when none occurs. Among that suffix's occurrences, the most recent one followed by the
    most tokens (at most k): an occurrence within k of the end is cut short by it, and in a loop (a run of one
    repeated token, a repeated line) an older one proposes the full k, the loop's continuation."""
    size = len(tokens)
    if k < 1 or size < min_n + 1:
        return []
    # A substring search over the ids' bytes (C speed; numpy over a few candidates cost ~20 us a sequence,
    # 5 ms a step of 256); a match at an offset that is not a whole id is skipped.
    data, width = tokens.tobytes(), tokens.itemsize
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = data[(size - n) * width :]
        end = (size - 1) * width  # an occurrence ends before the last token
        # Older occurrences are followed by more tokens: go back until one is followed by k (or none is left).
        follower = -1
        while (at := data.rfind(suffix, 0, end)) >= 0:
            end = at + len(suffix) - 1
            if at % width == 0:
                follower = at // width + n
                if size - follower >= k:
                    break
        if follower >= 0:
            return tokens[follower : follower + k].tolist()
    return []


def can_speculate(seq: Sequence) -> bool:
    """Whether `seq`'s sampling allows drafts. Requests whose logits processing reads their own history
    (penalties, bad words, min_tokens, logit bias, allowed ids), min_p, logprobs and structured output decode
    one token a step: the verify step applies only temperature, top-k and top-p to its draft rows."""
    return not seq.params.extras and seq.grammar is None


class TokenMirror:
    """A sequence's known token ids as a growing numpy array, extended by what became known since the last look
    (the proposer runs every step: converting the whole list each time would cost O(length))."""

    __slots__ = ("array", "size")

    def __init__(self) -> None:
        self.array = np.zeros(64, np.int32)  # (ids fit; half the bytes to search)
        self.size = 0

    def view(self, token_ids: list[int], known: int | None = None, guess: list[int] | tuple[()] = ()) -> np.ndarray:
        """The first `known` ids (all by default), then `guess`: the draft of a verify step still in flight,
        written past the known ones (the ids that arrive overwrite it)."""
        n = len(token_ids) if known is None else known
        if n < self.size:  # tokens were dropped (never while a sequence speculates; cheap to redo anyway)
            self.size = 0
        end = n + len(guess)
        if end > len(self.array):
            grown = np.zeros(max(end, 2 * len(self.array)), np.int32)
            grown[: self.size] = self.array[: self.size]
            self.array = grown
        if n > self.size:
            self.array[self.size : n] = token_ids[self.size : n]
            self.size = n
        self.array[n:end] = guess
        return self.array[:end]


class LookPacing:
    """Async scheduling with speculative decoding: which steps look for drafts. A look is cheap on the host,
    but a verify step costs the GPU more than a decode step (1 + K rows a sequence) and gives nothing more
    when its drafts fail. So steps look again at once after a verify step whose drafts paid: accepted, and
    its tokens a second at least the plain steps' (a moving average); otherwise they wait for doubling
    intervals (up to `most` steps). What a step gave is known when it is applied, a step after it is
    scheduled: the pacing hears of each look one step late."""

    def __init__(self, most: int = 32, smoothing: float = 0.25):
        self.most = most
        self.interval = 1
        self.wait = 0  # steps left before the next look
        self.smoothing = smoothing
        self.decode_rate: float | None = None  # tokens a second of the steps that did not look (a moving average)

    def due(self) -> bool:
        """Called once before each step is scheduled: does it look for drafts?"""
        if self.wait > 0:
            self.wait -= 1
            return False
        return True

    def observe(self, probed: bool, drafted: bool, tokens: int = 0, seconds: float = 0.0) -> None:
        """After a step that looked for drafts (`probed`), or accepted some (`drafted`), and gave `tokens` in
        `seconds` of wall time; or after a step that did not look (neither), whose rate the looks are held to."""
        rate = tokens / seconds if tokens and seconds > 0 else None
        if not probed and not drafted:
            if rate is not None:
                old = self.decode_rate
                self.decode_rate = rate if old is None else old + self.smoothing * (rate - old)
            return
        paid = drafted and (self.decode_rate is None or rate is None or rate >= self.decode_rate)
        if paid:
            self.interval, self.wait = 1, 0
        else:
            self.interval = min(2 * self.interval, self.most)
            self.wait = self.interval


@dataclass
class SpecStats:
    """Acceptance so far (vLLM's spec_decode counters): drafts proposed, their tokens, and those accepted,
    also by draft position; and the steps that looked for none, their batch over disable_by_batch_size."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    num_steps_over_batch_size: int = 0

    def add(self, num_drafted: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_drafted:
            self.accepted_per_pos += [0] * (num_drafted - len(self.accepted_per_pos))
        for i in range(num_accepted):
            self.accepted_per_pos[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verified draft: accepted ones plus the bonus token (vLLM's definition)."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
