"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

One rule covers prefill and decode: a scheduled sequence computes its next
`min(num_tokens - num_computed_tokens, budget)` tokens, so long prompts are chunked and prefill chunks
share a step with decodes under `max_num_batched_tokens`. Running sequences go first (decodes keep
flowing), then waiting ones are admitted while blocks, seats and budget last. When a running sequence
needs a block and none is free, the least important running sequence is preempted (its blocks freed, its
tokens recomputed later, cheaply when its prefix is still cached).

Speculative decoding (n-gram): a decoding sequence with a draft computes its last token and the draft's tokens
in one step (1 + k tokens) and gets a placeholder for each token the step may emit (k + 1), as if every draft
token were accepted; when the tokens arrive, `settle` takes back what the step rejected (placeholders, computed
KV, the blocks only they used). So with async scheduling the next step is scheduled while a verify step runs:
its positions may be too far by the rejected count, which the device subtracts (model_runner: prev_shift).
A draft never preempts: when its blocks are not free the sequence decodes one token instead.
"""

import bisect
from collections.abc import Callable

from nanoserve.engine_pod.block_manager import BlockManager
from nanoserve.engine_pod.config import Config
from nanoserve.engine_pod.sequence import PLACEHOLDER, Sequence, SequenceStatus
from nanoserve.engine_pod.spec_decode import TokenMirror, can_speculate, propose_ngram


# Ordering policies: a sort key, smaller runs first and is preempted last.
def fcfs_key(seq: Sequence) -> tuple:
    return (seq.arrival, seq.seq_id)


def priority_key(seq: Sequence) -> tuple:
    return (seq.params.priority, seq.arrival, seq.seq_id)


POLICIES: dict[str, Callable[[Sequence], tuple]] = {"fcfs": fcfs_key, "priority": priority_key}


class Scheduler:
    def __init__(self, config: Config, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.eos_token_ids = set(config.eos_token_ids)
        self.key = POLICIES[config.scheduling_policy]
        self.block_manager = block_manager
        self.waiting: list[Sequence] = []  # sorted by self.key
        self.running: list[Sequence] = []  # sorted by self.key
        self.num_preemptions = 0
        self.spec = config.speculative
        self.lookups = 0  # sequences whose draft the last schedule() looked up

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=self.key)

    def schedule(self, drafts: bool = True) -> list[tuple[Sequence, int]]:
        """Pick this step's batch: (sequence, number of tokens to compute now) pairs. `drafts`: speculative
        decoding may propose (off in the constrained pipeline, whose sampling is one token a row)."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        self.lookups = 0
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending and self._reaches_length(seq, seq.num_tokens - 1):
                i += 1  # its last token is on the way and ends it: nothing more to compute
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            draft = self._propose(seq, budget) if drafts and self.spec is not None and n == 1 else []
            n += len(draft)
            while not self.block_manager.try_allocate(seq, n):
                if draft:  # speculation takes only free blocks
                    draft, n = [], 1
                    continue
                victim = self.running[-1]  # the least important running sequence
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                seq.draft_ids = draft
                batch.append((seq, n))
                budget -= n
                i += 1

        # No admissions in a step that preempted: memory is tight, let the running ones finish first.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            hits = self.block_manager.find_cached_prefix(seq)
            n = min(seq.num_tokens - len(hits) * self.block_manager.block_size, budget)
            if not self.block_manager.can_allocate(seq, n, hits):
                break
            self.waiting.pop(0)
            self.block_manager.take_prefix(seq, hits)
            self.block_manager.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=self.key)
            batch.append((seq, n))
            budget -= n
        return batch

    def _propose(self, seq: Sequence, budget: int) -> list[int]:
        """A draft for decoding `seq`, at most as long as the budget, its max_tokens and the model length allow
        after the token the step adds anyway. When the step in flight has not brought `seq`'s newest tokens
        back (async scheduling), the lookup runs on the ids known followed by that step's draft, as if all of
        it were accepted, and its first token, a guess of the newest token, is not drafted: verification is
        exact, so a wrong guess costs acceptance, never a token."""
        spec = self.spec
        assert spec is not None
        if not can_speculate(seq):
            return []
        room = min(
            spec.num_speculative_tokens,
            budget - 1,
            seq.params.max_tokens - seq.num_completion_tokens - 1,
            self.max_model_len - seq.num_tokens - 1,
        )
        if room < 1:
            return []
        if seq.token_mirror is None:
            seq.token_mirror = TokenMirror()
        pending = seq.num_pending  # the step in flight's placeholders: 1 + its draft
        guess = seq.flight_draft if pending else []
        tokens = seq.token_mirror.view(seq.token_ids, seq.num_tokens - pending, guess)
        self.lookups += 1
        if not pending:
            return propose_ngram(tokens, spec.prompt_lookup_min, spec.prompt_lookup_max, room)
        draft = propose_ngram(tokens, spec.prompt_lookup_min, spec.prompt_lookup_max, room + 1)
        seq.draft_basis = guess + draft[:1]  # what it assumes the step in flight emits (`settle` checks)
        return draft[1:]

    def _preempt(self, seq: Sequence) -> None:
        seq.draft_ids = []
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def advance(self, batch: list[tuple[Sequence, int]], sampling: list[Sequence]) -> None:
        """The step is launched: count its tokens as computed and give each sampling sequence a
        placeholder for each token it may emit (1 + its draft)."""
        for seq, n in batch:
            seq.num_computed_tokens += n
        for row, seq in enumerate(sampling):
            width = 1 + len(seq.draft_ids)
            seq.token_ids += [PLACEHOLDER] * width
            seq.num_pending += width
            seq.pending_row = row
            seq.flight_draft, seq.flight_basis = seq.draft_ids, seq.draft_basis
            seq.draft_ids, seq.draft_basis = [], []

    def resolve(self, seq: Sequence, position: int, token: int) -> None:
        """A sampled token arrived: fill its placeholder, retire `seq` if the token ends it."""
        seq.token_ids[position] = token
        seq.num_pending -= 1
        reason = self._stop_reason(seq, position, token)
        if reason:
            seq.finish_reason = reason
            self.finish(seq)

    def settle(self, seq: Sequence, position: int, emitted: list[int], width: int) -> None:
        """A step's `emitted` tokens for `seq` are in place from `position`, of the `width` placeholders it had:
        the rest go (a later step's, behind them, move up), with the KV counted for the rejected drafts and
        the blocks only they used. A step in flight behind it whose draft assumed other tokens will most likely
        see it rejected: the next lookup assumes that step emits one token."""
        if count := width - len(emitted):
            del seq.token_ids[position + len(emitted) : position + width]
            seq.num_pending -= count
            if seq.status == SequenceStatus.RUNNING:  # (a preempted one counts no KV)
                seq.num_computed_tokens -= count
            self.block_manager.trim(seq)
        if seq.num_pending and seq.flight_basis != emitted:
            seq.flight_draft = []

    def _stop_reason(self, seq: Sequence, position: int, token: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids or token in p.stop_token_ids:
            return "stop"
        return "length" if self._reaches_length(seq, position) else None

    def _reaches_length(self, seq: Sequence, position: int) -> bool:
        """Whether the token at `position` is the last one `seq` may have."""
        return position + 1 - seq.num_prompt_tokens >= seq.params.max_tokens or position + 1 >= self.max_model_len

    def finish(self, seq: Sequence) -> None:
        """Retire `seq` (finished, stopped by a stop string, or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.draft_ids = []
        if seq.num_pending:  # tokens still in flight are dropped with the request
            del seq.token_ids[-seq.num_pending :]
            seq.num_pending = 0
        if seq.block_table:  # its last full blocks, not hashed while their tokens were in flight
            self.block_manager.register_computed(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
