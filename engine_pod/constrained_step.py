"""The engine's step under async scheduling when requests have grammars: sampling waits for the grammar
mask, so the step is a pipeline around the grammar process (engine_pod/grammar_process.py), or around the
mask made inline when there is none (`--no-grammar-process`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nanoserve.engine_pod.in_flight import InFlight, StepResult, Unsampled
from nanoserve.engine_pod.sampler import sampling_inputs
from nanoserve.engine_pod.sequence import Sequence
from nanoserve.engine_pod.step_inputs import prepare

if TYPE_CHECKING:
    from nanoserve.engine_pod.llm_engine import LLMEngine


def constrained_step(engine: LLMEngine) -> StepResult:
    """Async scheduling with structured output, as a pipeline. A row's mask needs its previous token, so
    sampling waits for the mask, but nothing else does: each call hands step N's tokens to the grammar
    process, which has the matchers accept them and then fills step N+1's mask, while this thread applies
    the same tokens and schedules step N+2, all while N+1's forward runs on the GPU; then it launches N+1's
    sampling and N+2's forward right behind it."""
    pending, engine.unsampled = engine.unsampled, None
    done, engine.in_flight = engine.in_flight, None
    accept: list[tuple[Sequence, int, int]] = []  # (sequence, its placeholder's position, token)
    if done is not None:
        tokens = done.tokens.wait()
        accept = [
            (seq, seq.num_tokens - seq.num_pending, token)  # (its oldest placeholder: `done`'s)
            for row, (seq, token) in enumerate(zip(done.seqs, tokens))
            if seq.grammar is not None and not seq.is_finished and row not in done.blocked
        ]
    to_accept = [(s.grammar, t) for s, _, t in accept]
    job = engine._mask(pending.seqs if pending is not None else [], to_accept)
    out = engine._apply(done, grammar_accepted=True) if done is not None else []
    batch = engine.scheduler.schedule(drafts=False) if engine.constrained or pending is None else []
    if batch:
        inputs, sampling = prepare(batch, engine.config.kvcache_block_size)
        if inputs.prev_rows is not None and pending is not None:  # the tokens `pending` is about to sample
            inputs.prev_count = len(pending.seqs)
        if sampling:
            inputs.sampling = sampling_inputs(sampling, engine.rng, engine.config.eos_token_ids)
            inputs.defer_sampling = True
        engine.scheduler.advance(batch, sampling)
    elif pending is None and done is None and engine.has_unfinished():
        raise RuntimeError("scheduler made no progress although requests are pending")
    grammar = job.result()
    out = _end_grammars(engine, out, accept, grammar.refused, grammar.terminated)
    if pending is not None:
        tokens, logprobs = engine._run("sample_deferred", grammar.mask, local=True)
        blocked = grammar.mask.blocked if grammar.mask is not None else frozenset()
        engine.in_flight = InFlight(pending.seqs, engine.download(tokens, logprobs), blocked)
    if batch:
        _, _, prompt = engine._run("run", inputs)
        engine._score(inputs, prompt)
        if sampling:
            engine.unsampled = Unsampled(sampling)
    return StepResult(batch, out)


def _end_grammars(engine: LLMEngine, out, accept, refused: list[int], terminated: list[int]):
    """After the step's accepts: a grammar complete ends its request; a refused token (only if the sampler
    left the mask, which it never should) ends it too, the token unseen."""
    for i in terminated:
        seq = accept[i][0]
        if not seq.is_finished:
            seq.finish_reason = "stop"
            engine._retire(seq)
    for i in refused:
        seq, position, _ = accept[i]
        seq.finish_reason = "abort"
        engine._retire(seq)
        del seq.token_ids[position:]
        out = [(s, None if s is seq else t) for s, t in out]
    return out
