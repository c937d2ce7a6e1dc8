"""Structured output on xgrammar: constraints compiled into grammars, and each step's token mask.

`Grammars` compiles a request's StructuredOutputsParams into a matcher (a grammar's state) when the request
is made: on a worker thread of the engine core process, never on its step loop, with a cache keyed by the constraint.
Each step, `grammar_mask` has the matchers of the constrained rows accept the tokens just sampled, then asks
them which tokens may come next (a bitmask on the host); under async scheduling on CUDA that is done in the
grammar process (grammar_process.py) while the engine thread applies the same tokens and schedules the next
step (constrained_step.py). Rank 0's model runner applies the mask to those rows' logits with
`apply_grammar_mask` before temperature, top-k and top-p.
The mask allows EOS only where the grammar may end; a matcher that accepted EOS is terminated.
"""

import json
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nanoserve.engine_pod.errors import InvalidRequestError
from nanoserve.engine_pod.sequence import Sequence
from nanoserve.engine_pod.structured_params import StructuredOutputsParams

# Free whitespace between JSON tokens, at most this many characters a run (indentation 2 nine levels deep
# fits): a model stuck emitting whitespace (a known failure mode) closes its JSON instead of running to max_tokens.
MAX_WHITESPACE = 20
CACHE_SIZE = 256  # compiled grammars kept (a schema sent by many requests compiles once)
_WHAT = {
    "json": "JSON schema",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "json_object": "JSON object",
}


class Grammars:
    """xgrammar's compiler for one tokenizer; thread-safe (requests compile on several threads at once)."""

    def __init__(self, model_folder: str, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr
        from transformers import AutoTokenizer

        # Its own tokenizer: the engine thread uses the engine's, and a Rust tokenizer is not shared by threads.
        tokenizer = AutoTokenizer.from_pretrained(model_folder)
        stops = stop_token_ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None)
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        self.ends = stop_tokens(self.info)
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=min(8, os.cpu_count() or 1))
        self.cache: OrderedDict[tuple, _Cached] = OrderedDict()
        self.lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams):
        """The compiled grammar of `spec`; InvalidRequestError (naming spec.param) if it does not compile."""
        return self._cached(spec).compiled

    def _cached(self, spec: StructuredOutputsParams) -> "_Cached":
        key = spec.key()
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        try:
            entry = _Cached(self._compile(spec))
        except (RuntimeError, ValueError, TypeError) as e:
            raise InvalidRequestError(f"'{spec.param}': invalid {_WHAT[spec.kind]}: {_clean(e)}", spec.param) from None
        with self.lock:
            self.cache[key] = entry
            while len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        return entry

    def _compile(self, spec: StructuredOutputsParams):
        c, kind = self.compiler, spec.kind
        if kind in ("json", "json_object"):
            # json_object: any object, so extra properties must be allowed (strict_mode would allow only {}).
            schema = spec.json if kind == "json" else {"type": "object"}
            text = schema if isinstance(schema, str) else json.dumps(schema)
            return c.compile_json_schema(
                text,
                strict_mode=spec.strict and kind == "json",
                any_whitespace=not spec.disable_any_whitespace,
                max_whitespace_cnt=MAX_WHITESPACE,
            )
        if kind == "regex" and spec.regex is not None:
            return c.compile_regex(spec.regex)
        if kind == "choice" and spec.choice is not None:  # JSON's string escapes are EBNF literals' escapes too
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec.choice))
        # EBNF (GBNF) rules are written `name ::= ...`; a grammar without one is Lark (`name: ...`), as vLLM tells them.
        grammar = spec.grammar
        assert kind == "grammar" and grammar is not None  # StructuredOutputsParams has exactly one kind set
        return c.compile_grammar(grammar) if "::=" in grammar else c.compile_lark(grammar)

    def matcher(self, spec: StructuredOutputsParams):
        """A fresh matcher for one request (matchers hold one sequence's state; grammars are shared)."""
        return new_matcher(self.compile(spec), self.ends)

    def handle(self, spec: StructuredOutputsParams, seq_id: int):
        """What the grammar process makes a request's matcher from: `spec`'s compiled grammar, serialized (on
        the compiling thread, once per grammar in the cache, as compile)."""
        from nanoserve.engine_pod.grammar_process import GrammarHandle

        entry = self._cached(spec)
        payload = entry.serialized
        if payload is None:  # (two threads at once would both serialize it: the same text)
            payload = entry.serialized = entry.compiled.serialize_json()
        return GrammarHandle(seq_id, spec.key(), payload)


@dataclass
class _Cached:
    """A compiled grammar in the cache, and its serialized form once the grammar process has needed it."""

    compiled: Any
    serialized: str | None = None


def stop_tokens(info) -> frozenset[int] | None:
    """The tokens that can complete a matcher of `info`'s tokenizer (its stop tokens); None: any token can."""
    return frozenset(info.stop_token_ids) or None


def new_matcher(compiled, ends: frozenset[int] | None):
    """A matcher of `compiled`, here or in the grammar process. A tokenizer without a stop token (`ends` None):
    it ends where the grammar ends, or the request could never finish."""
    import xgrammar as xgr

    return xgr.GrammarMatcher(compiled, terminate_without_stop_token=ends is None)


def _clean(e: Exception) -> str:
    """xgrammar's message without its C++ source location."""
    text = str(e).strip()
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
    return text.replace("Check failed: (error.empty()) is false: ", "")


def _stays_on_rank0():
    return None


@dataclass
class GrammarMask:
    """Which tokens each constrained sampling row may sample next: `bitmask` row j (xgrammar's packed bits,
    int32 [n, ceil(vocab / 32)], 1 = allowed) is for sampling row `rows[j]`. `blocked`: the sampling rows
    whose grammar allows no token at all (the vocabulary cannot spell what it needs next)."""

    rows: np.ndarray
    bitmask: torch.Tensor
    blocked: frozenset[int] = frozenset()

    def __reduce__(self):  # pickled to tensor-parallel workers as None: only rank 0 samples
        return _stays_on_rank0, ()


@dataclass
class GrammarStep:
    """What a step's grammar work did: the mask it filled (None: no constrained row), and of the tokens it
    was given to accept first, the indices of those refused and of those that completed their grammar."""

    mask: GrammarMask | None
    refused: list[int]
    terminated: list[int]


_POOL_ROWS = 16  # fewer rows fill faster in one loop than through xgrammar's thread pool
_POOL_THREADS = min(8, os.cpu_count() or 1)
_pool = None  # xgrammar's BatchGrammarMatcher (one thread fills masks: the engine's, or the grammar process's)


def grammar_mask(
    seqs: list[Sequence],
    vocab_size: int,
    pool: bool = False,
    accept: tuple | list[tuple[Any, int]] = (),
    ends: frozenset[int] | None = None,
) -> Future[GrammarStep]:
    """Let each (matcher, token) of `accept` accept its token, then fill the mask of the constrained ones among
    the sampling rows `seqs`, here and now (a future already done: the grammar process's reply is read the
    same way). `ends`: the tokens that can complete a matcher (None: any can; `Grammars.ends`). `pool`: fill
    the rows on xgrammar's threads (3x faster at 256 rows on a 16-core GPU host; on a CPU engine they would
    fight the model's own threads). A thread of this process would not help: xgrammar's calls take the GIL
    back several times each, so they run in series with the engine thread's Python (bench/RESULTS.md)."""
    rows = constrained_rows(seqs)
    if not rows and not accept:
        return completed(GrammarStep(None, [], []))
    matchers = [seqs[i].grammar for i in rows]
    return completed(accept_and_fill(list(accept), np.asarray(rows, np.int64), matchers, vocab_size, pool, ends))


def constrained_rows(seqs: list[Sequence]) -> list[int]:
    """The sampling rows that need a mask. (A row whose request the previous step finished samples a token
    nobody reads: its matcher is done.)"""
    return [i for i, seq in enumerate(seqs) if seq.grammar is not None and not seq.is_finished]


def completed(step: GrammarStep) -> Future[GrammarStep]:
    done: Future[GrammarStep] = Future()
    done.set_result(step)
    return done


def accept_and_fill(
    accept: list,
    rows: np.ndarray,
    matchers: list,
    vocab_size: int,
    pool: bool,
    ends: frozenset[int] | None,
    out: torch.Tensor | None = None,
) -> GrammarStep:
    """grammar_mask's work, here or in the grammar process (grammar_process.py), which passes the shared
    bitmask as `out` (its first rows are filled)."""
    import xgrammar as xgr

    global _pool
    if pool and _pool is None:
        _pool = xgr.BatchGrammarMatcher(max_threads=_POOL_THREADS)
    bitmask = xgr.allocate_token_bitmask(max(1, len(rows)), vocab_size) if out is None else out[: len(rows)]
    refused, terminated = [], []
    if accept:
        ok = xgr.BatchGrammarMatcher.batch_accept_token([m for m, _ in accept], [t for _, t in accept])
        # A matcher with stop tokens completes only on one, so only those are asked (a call a row fewer).
        for i, (matcher, token) in enumerate(accept):
            if not ok[i]:
                refused.append(i)
            elif (ends is None or token in ends) and matcher.is_terminated():
                terminated.append(i)
    if not len(rows):
        return GrammarStep(None, refused, terminated)
    # A grammar the tokens just completed has no next mask (xgrammar raises): its row samples a token
    # nobody reads (its request ends with this step's outputs), under an all-allowing mask. Those completed
    # by earlier steps' tokens are not among the rows: their requests have ended.
    completed = {id(accept[i][0]) for i in terminated}
    live = [j for j, matcher in enumerate(matchers) if id(matcher) not in completed]
    if out is not None and len(live) < len(rows):  # (allocate_token_bitmask's rows allow all tokens)
        bitmask[[j for j in range(len(rows)) if id(matchers[j]) in completed]] = -1
    if _pool is not None and pool and len(live) >= _POOL_ROWS:
        _pool.batch_fill_next_token_bitmask([matchers[j] for j in live], bitmask, live)
    else:
        for j in live:
            matchers[j].fill_next_token_bitmask(bitmask, j)
    blocked = frozenset(rows[~bitmask.numpy().any(1)].tolist())  # (numpy: torch's took 0.5-15 ms on CPU)
    return GrammarStep(GrammarMask(rows, bitmask, blocked), refused, terminated)


_BIT_TABLE: dict[torch.device, torch.Tensor] = {}  # [256, 8]: the bits of each byte value


def apply_grammar_mask(logits: torch.Tensor, mask: GrammarMask) -> None:
    """Set the disallowed tokens of the mask's rows to -inf, in place, on the logits' device."""
    device, vocab = logits.device, logits.shape[-1]
    # Byte i of the packed bits holds tokens 8i..8i+7 (little-endian int32 words): one table lookup unpacks it.
    table = _BIT_TABLE.get(device)
    if table is None:
        bits = torch.arange(8, device=device)
        table = _BIT_TABLE[device] = ((torch.arange(256, device=device).unsqueeze(1) >> bits) & 1).bool()
    packed = _to_device(mask.bitmask, device).view(torch.uint8)
    refused = ~table[packed.long()].flatten(1)[:, :vocab]
    if len(mask.rows) == logits.shape[0] and (mask.rows == np.arange(len(mask.rows))).all():
        logits.masked_fill_(refused, float("-inf"))  # every row constrained, in order: no gather
    else:
        rows = _to_device(torch.from_numpy(mask.rows), device)
        logits[rows] = logits[rows].masked_fill(refused, float("-inf"))


_STAGING: dict[torch.dtype, torch.Tensor] = {}  # pinned host buffers the masks go to the GPU through


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on the device without waiting for the GPU: a copy from pageable memory may wait for the stream
    (here: the forward running while the mask was made), one from pinned memory does not. A buffer is reused
    from the next step on, when this step's tokens, sampled after the copy, have been waited for."""
    if device.type != "cuda":
        return host
    if host.is_pinned():  # the grammar process's shared bitmask
        return host.to(device, non_blocking=True)
    n = host.numel()
    buf = _STAGING.get(host.dtype)
    if buf is None or buf.numel() < n:
        buf = _STAGING[host.dtype] = torch.empty(
            max(n, 2 * (0 if buf is None else buf.numel())), dtype=host.dtype, pin_memory=True
        )
    staged = buf[:n].view(host.shape)
    staged.copy_(host)
    return staged.to(device, non_blocking=True)
