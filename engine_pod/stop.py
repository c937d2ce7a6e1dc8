"""Stop strings: detect them in the generated text and cut the text before them."""

from nanoserve.engine_pod.sequence import Sequence


class StopChecker:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def hit(self, seq: Sequence, end: int) -> bool:
        """Whether the token before position `end` completed one of `seq`'s stop strings (tokens from
        `end` on may still be placeholders)."""
        stops = seq.params.stop
        if not stops or end - seq.num_prompt_tokens < seq.params.min_tokens:  # (vLLM's min_tokens rule)
            return False
        # A stop string of L characters ends within the last L tokens (plus a few for multi-token characters).
        window = seq.token_ids[max(seq.num_prompt_tokens, end - max(map(len, stops)) - 4) : end]
        tail = self.tokenizer.decode(window, skip_special_tokens=True)
        return any(s in tail for s in stops)

    def text(self, seq: Sequence) -> str:
        p = seq.params
        text = self.tokenizer.decode(seq.completion_token_ids, skip_special_tokens=p.skip_special_tokens)
        return cut_at_stop(text, p.stop, p.include_stop_str_in_output)


def find_stop(text: str, stops: list[str]) -> tuple[int, int] | None:
    """(start, length) of the first occurrence of any stop string, or None."""
    return min(((i, len(s)) for i, s in ((text.find(s), s) for s in stops) if i >= 0), default=None)


def cut_at_stop(text: str, stops: list[str], include: bool = False) -> str:
    """The text before the first occurrence of any stop string (`include`: up to its end)."""
    found = find_stop(text, stops)
    if found is None:
        return text
    start, length = found
    return text[: start + length] if include else text[:start]
