"""What a step leaves behind for the next one: its result, and (async scheduling) the launched work whose tokens
are still on the device."""

from dataclasses import dataclass
from typing import NamedTuple

from nanoserve.engine_pod.sequence import Sequence
from nanoserve.engine_pod.step_inputs import SampledTokens


class StepResult(NamedTuple):
    batch: list[tuple[Sequence, int]]  # what the step scheduled: (sequence, tokens it computes)
    outputs: list[tuple[Sequence, int | None]]  # (sequence, new token): this step's, or the previous one's


@dataclass
class InFlight:
    """A launched step's sampling rows: the sequences and the tokens coming (each row's go into its sequence's
    oldest placeholders: steps are applied in order)."""

    seqs: list[Sequence]
    tokens: SampledTokens
    blocked: frozenset[int] = frozenset()  # rows whose grammar allowed no token: what they sampled is invalid
    spec_drafts: list[int] | None = None  # a verify step: each row's number of draft tokens
    looked: bool = False  # the step looked for drafts (speculative decoding's pacing)
    launched_at: float = 0.0  # perf_counter() when it was launched
    accepted: int = 0  # draft tokens accepted, counted as it is applied

    def wait(self) -> tuple[list[int], list[list[int]] | None]:
        """Each row's (first) token; for a verify step also the accepted tokens after it, per row."""
        flat = self.tokens.wait()
        if self.spec_drafts is None:
            return flat, None
        width = len(flat) // len(self.seqs)  # spec_verify.verify's rows: count, then the emitted tokens
        rows = [flat[i * width : (i + 1) * width] for i in range(len(self.seqs))]
        return [r[1] for r in rows], [r[2 : 1 + r[0]] for r in rows]


@dataclass
class Unsampled:
    """A launched step whose sampling waits for its mask: its sampling rows."""

    seqs: list[Sequence]
