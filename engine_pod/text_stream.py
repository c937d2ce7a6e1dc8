"""Incremental text of a completion: what to send after each batch of new tokens, at O(1) amortized cost a
token, such that the concatenation of the deltas equals the final text exactly (streaming or not).

Tokens are detokenized by the `tokenizers` library's DecodeStream, which holds back an incomplete UTF-8
character until its last byte arrives. A tail that could still grow into a stop string is held back too;
a stop string cuts the text before it. At the end, bytes of a character that never completed are decoded
as the full decode would (U+FFFD), so the text equals `decode(ids, skip_special_tokens=True)` cut at the
first stop string.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

from nanoserve.engine_pod.stop import cut_at_stop, find_stop

_CONTEXT = 4  # ids decoded before an unfinished tail at the end, so that its text is as in the full decode


class TextStream:
    def __init__(
        self,
        tokenizer: Any,
        stop: list[str] | None = None,
        skip_special_tokens: bool = True,
        include_stop: bool = False,
    ) -> None:
        """`include_stop`: a stop string that ends the text is kept (vLLM's include_stop_str_in_output)."""
        self.tokenizer = tokenizer
        self.backend = tokenizer._tokenizer  # the Rust tokenizer of a fast (TokenizersBackend) tokenizer
        self.skip_special = skip_special_tokens
        self.decoder = DecodeStream(skip_special_tokens=skip_special_tokens)
        # skipped, special tokens decode as nothing: not an unfinished character
        self.special = set(tokenizer.all_special_ids) if skip_special_tokens else set()
        self.stop = [s for s in (stop or []) if s]
        self.include_stop = include_stop
        self.pending = ""  # decoded, not yet sent: a possible stop-string start
        self.unflushed: list[int] = []  # ids since the decoder last produced text (an incomplete character)
        self.recent: list[int] = []  # the last ids that did produce text, as context for the final flush
        self.stopped = False  # a stop string was found: nothing more is sent
        self.num_decoded = 0  # tokens fed to the decoder (each exactly once)

    def push(self, token_ids: list[int], finished: bool) -> str:
        """The text to send for these new tokens (possibly ""). `finished`: no more tokens follow."""
        if self.stopped:
            return ""
        for t in token_ids:
            self.num_decoded += 1
            piece = self.decoder.step(self.backend, t)
            if piece is None:
                if t not in self.special:
                    self.unflushed.append(t)
                continue
            self.pending += piece
            self.recent = (self.recent + self.unflushed + [t])[-_CONTEXT:]
            self.unflushed = []
        if finished and self.unflushed:
            self.pending += self._flush()
        if find_stop(self.pending, self.stop) is not None:  # a stop string: the text ends before it (or with it)
            out = cut_at_stop(self.pending, self.stop, self.include_stop)
            self.stopped, self.pending = True, ""
            return out
        keep = 0 if finished else self._stop_prefix()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out

    def _stop_prefix(self) -> int:
        """Length of the longest tail of `pending` that is the start of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:k]):
                    best = k
                    break
        return best

    def _flush(self) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)  # noqa: E731
        return decode(self.recent + self.unflushed)[len(decode(self.recent)) :]
