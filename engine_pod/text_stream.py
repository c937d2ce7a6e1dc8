"""Incremental text for streaming: what to send after each new token, so that the concatenation of
the deltas equals the final (stop-cut) text exactly.

Two things are held back until they resolve: an incomplete UTF-8 character (decoded as U+FFFD), and a
tail of the text that could be the start of a stop string.
"""
from nanoserve.engine_pod.stop import cut_at_stop


class TextStream:

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.sent = 0  # characters of the text already sent

    def full_text(self) -> str:
        return cut_at_stop(self.tokenizer.decode(self.token_ids, skip_special_tokens=True), self.stop)

    def push(self, token_ids: list[int], finished: bool) -> str:
        self.token_ids += token_ids
        text = self.full_text()
        end = len(text)
        if not finished:
            if text.endswith("\ufffd"):
                end -= 1
            for s in self.stop:  # hold back a tail that may grow into a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end -= k
                        break
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta
