"""Structured output's matchers in a process of their own, beside the engine's step loop.

xgrammar's calls take the GIL back several times a call, so in the engine's process a grammar thread's accepts
and fills run in series with the engine thread's Python, whatever the threads (bench/RESULTS.md, 2026-12-03).
Here they run beside it: each step the engine sends the tokens to accept and the rows to fill over a socket,
goes on applying tokens and scheduling, and reads the reply when sampling needs the mask. The bitmask itself
is written into shared memory, pinned on CUDA so that it goes to the GPU without a staging copy.

Used under async scheduling (constrained_step.py), where the mask is filled while the next step is made. The
engine still compiles every grammar (a bad one is its request's 400, and the cache is the engine's) and sends
it serialized, once while the worker keeps it. A dead worker fails the step, so its requests end with an error.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import tempfile
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe
from typing import cast

import numpy as np
import torch

from nanoserve.engine_pod.errors import GrammarProcessDied
from nanoserve.engine_pod.sequence import Sequence
from nanoserve.engine_pod.structured_output import (
    CACHE_SIZE,
    GrammarMask,
    GrammarStep,
    accept_and_fill,
    completed,
    constrained_rows,
    new_matcher,
    stop_tokens,
)
from nanoserve.engine_pod.tp_workers import describe_exit


@dataclass(frozen=True)
class GrammarHandle:
    """`seq.grammar` when the matchers live in the grammar process: the request's matcher there is made from
    the compiled grammar `key`, whose `CompiledGrammar.serialize_json()` is `payload`."""

    seq_id: int
    key: tuple
    payload: str


class GrammarProcess:
    """Rank 0's side of the grammar process: `step` sends a step's work, its future's `result()` reads the
    reply. Only the engine thread calls it, one step at a time."""

    def __init__(self, tokenizer_info: str, vocab_size: int, max_rows: int, pool: bool, pin: bool):
        words = (vocab_size + 31) // 32
        size = max_rows * words * 4
        # An unlinked file: nothing is left in /dev/shm whichever process dies.
        self._file = tempfile.TemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self._file.truncate(size)
        self._map = mmap.mmap(self._file.fileno(), size)
        self.bitmask = torch.from_numpy(np.frombuffer(self._map, np.int32).reshape(max_rows, words))
        self._pinned = pin and _pin(self.bitmask)
        self._conn, theirs = Pipe()
        fds = (theirs.fileno(), self._file.fileno())
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, *map(str, fds), str(max_rows), str(words)], pass_fds=fds
        )
        theirs.close()
        self._send(("init", tokenizer_info, vocab_size, pool))
        self._sent: OrderedDict[tuple, None] = OrderedDict()  # the compiled grammars the worker holds
        self._registered: set[int] = set()  # the requests whose matcher the worker holds
        self._ops: list[tuple] = []  # for the worker before the next step's work: grammars, matchers, drops
        self._unread = False  # a step's reply not read yet (a step that raised before it needed the mask)

    def step(self, seqs: list[Sequence], accept: list[tuple[GrammarHandle, int]]) -> Future[GrammarStep] | GrammarReply:
        """Send: accept each (handle, token) of `accept`, then fill the mask of the constrained rows of `seqs`
        (structured_output.grammar_mask's work). Read the reply with `result()`; until then nothing else may
        be sent."""
        rows = constrained_rows(seqs)
        if not rows and not accept:
            return completed(GrammarStep(None, [], []))
        handles = [cast(GrammarHandle, seqs[i].grammar) for i in rows]
        for handle in handles:
            if handle.seq_id not in self._registered:
                self._register(handle)
        work = ([h.seq_id for h, _ in accept], [t for _, t in accept], [h.seq_id for h in handles])
        self._send(("step", self._take_ops(), *work))
        self._unread = True
        return GrammarReply(self, np.asarray(rows, np.int64))

    def drop(self, seq_id: int) -> None:
        """The request ended: its matcher goes with the next step's work."""
        if seq_id in self._registered:
            self._registered.discard(seq_id)
            self._ops.append(("drop", seq_id))

    def held(self) -> tuple[int, int]:
        """(matchers, compiled grammars) the worker holds, after the drops so far."""
        self._send(("held", self._take_ops()))
        matchers, grammars = self._recv()
        return matchers, grammars

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self._send(None)
                self.process.wait(5)
            except (GrammarProcessDied, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self._conn.close()
        if self._pinned:
            _cudart().cudaHostUnregister(self.bitmask.data_ptr())
        del self.bitmask
        self._map.close()
        self._file.close()

    def _register(self, handle: GrammarHandle) -> None:
        key = handle.key
        if key in self._sent:
            self._sent.move_to_end(key)
        else:
            self._ops.append(("grammar", key, handle.payload))
            self._sent[key] = None
        self._ops.append(("matcher", handle.seq_id, key))
        self._registered.add(handle.seq_id)
        while len(self._sent) > CACHE_SIZE:  # (its matchers keep an evicted grammar alive there)
            self._ops.append(("forget", self._sent.popitem(last=False)[0]))

    def _take_ops(self) -> list[tuple]:
        if self._unread:  # (its mask is not wanted any more; the worker's state moved on all the same)
            self._recv()
        self._ops, ops = [], self._ops
        return ops

    def _send(self, msg) -> None:
        try:
            self._conn.send(msg)
        except OSError:
            raise self._died() from None

    def _recv(self):
        self._unread = False
        try:
            kind, *reply = self._conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if kind == "error":
            raise RuntimeError(f"the grammar process failed: {reply[0]}")
        return reply

    def _died(self) -> GrammarProcessDied:
        try:
            code = self.process.wait(1)
        except subprocess.TimeoutExpired:
            code = None
        how = "is still running" if code is None else f"exited ({describe_exit(code)})"
        return GrammarProcessDied(f"the grammar process (pid {self.process.pid}) closed its socket and {how}")


class GrammarReply:
    """A step sent to the grammar process; `result()` waits for what it did."""

    def __init__(self, process: GrammarProcess, rows: np.ndarray):
        self.process, self.rows = process, rows

    def result(self) -> GrammarStep:
        refused, terminated, blocked = self.process._recv()
        if not len(self.rows):
            return GrammarStep(None, refused, terminated)
        bitmask = self.process.bitmask[: len(self.rows)]
        return GrammarStep(GrammarMask(self.rows, bitmask, frozenset(self.rows[blocked].tolist())), refused, terminated)


def _pin(bitmask: torch.Tensor) -> bool:
    """Page-lock the shared bitmask for the GPU's copy engine (False: not on CUDA, or refused)."""
    if not torch.cuda.is_available():
        return False
    nbytes = bitmask.numel() * bitmask.element_size()
    return int(_cudart().cudaHostRegister(bitmask.data_ptr(), nbytes, 0)) == 0


def _cudart():
    cudart = torch.cuda.cudart()
    assert cudart is not None  # (torch built with CUDA: is_available() said so)
    return cudart


def _serve(conn: Connection, bitmask: torch.Tensor) -> None:
    """The worker: each request's matcher by its id, the compiled grammars by their key."""
    import xgrammar as xgr

    _, info_json, vocab_size, pool = conn.recv()
    info = xgr.TokenizerInfo.deserialize_json(info_json)
    ends = stop_tokens(info)
    grammars: dict[tuple, xgr.CompiledGrammar] = {}
    matchers: dict[int, xgr.GrammarMatcher] = {}
    while (msg := _next(conn)) is not None:
        try:
            for op, *args in msg[1]:
                if op == "grammar":
                    grammars[args[0]] = xgr.CompiledGrammar.deserialize_json(args[1], info)
                elif op == "matcher":
                    matchers[args[0]] = new_matcher(grammars[args[1]], ends)
                elif op == "forget":
                    del grammars[args[0]]
                else:
                    del matchers[args[0]]
            if msg[0] == "held":
                conn.send(("ok", len(matchers), len(grammars)))
                continue
            accept_ids, tokens, row_ids = msg[2:]
            accept = [(matchers[i], t) for i, t in zip(accept_ids, tokens)]
            rows = np.arange(len(row_ids))
            step = accept_and_fill(accept, rows, [matchers[i] for i in row_ids], vocab_size, pool, ends, out=bitmask)
            blocked = sorted(step.mask.blocked) if step.mask is not None else []
            conn.send(("ok", step.refused, step.terminated, blocked))
        except Exception as e:  # noqa: BLE001 - the engine raises it, failing the step
            conn.send(("error", f"{type(e).__name__}: {e}"))


def _next(conn: Connection):
    """The next message; None also when the engine's end is closed (it exited without saying so)."""
    try:
        return conn.recv()
    except EOFError:
        return None


if __name__ == "__main__":
    conn_fd, shm_fd, max_rows, words = map(int, sys.argv[1:])
    shared = mmap.mmap(shm_fd, max_rows * words * 4)
    _serve(Connection(conn_fd), torch.from_numpy(np.frombuffer(shared, np.int32).reshape(max_rows, words)))
