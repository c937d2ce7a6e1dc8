"""`reasoning_content` apart from `content`, incrementally: the model thinks between `<think>` and
`</think>`, then answers. Any split of the output into pushes yields the same two texts as one push.

- "qwen3": the reasoning is what follows a leading `<think>` (whitespace before it is dropped), or the
  output from its start when the chat template left a `<think>` open at the end of the prompt
  (`open_in_prompt`, see prompt_opens_thinking), up to `</think>`. An output that does not start thinking
  is all content: Qwen3 with `enable_thinking: false` (its template writes an empty think block into the
  prompt) answers at once.
- "deepseek_r1": the reasoning is the output from its start (a leading `<think>` dropped) to `</think>`:
  the R1 templates open the think block in the prompt, so the model may or may not write `<think>`.

Thinking cut off by the end of the output stays reasoning. The tags are markup: every `<think>` and
`</think>` is taken out of both texts, the first `</think>` ending the reasoning. The whitespace right
after `</think>` (typically "\\n\\n") stays content, and the whitespace after `<think>` stays reasoning,
as vLLM's qwen3 and deepseek_r1 parsers do (they split at the tag and strip nothing).
"""

from __future__ import annotations

_OPEN, _CLOSE = "<think>", "</think>"
_KINDS = ("qwen3", "deepseek_r1")


def prompt_opens_thinking(prompt_text: str, kind: str) -> bool:
    """Whether the chat template ended the prompt inside an open think block (`...<think>\\n`), as the
    DeepSeek-R1 and Qwen3-2507 thinking templates do: the output then starts in the reasoning."""
    _check(kind)
    return prompt_text.rstrip().endswith(_OPEN)


class ReasoningParser:
    """One per response. States: "start" (undecided: whitespace and a possible `<think>` so far),
    "reasoning", "content"."""

    def __init__(self, kind: str, open_in_prompt: bool = False) -> None:
        _check(kind)
        self.thinks_first = kind == "deepseek_r1" or open_in_prompt  # reasoning even without `<think>`
        self.state = "start"
        self.buf = ""  # not yet sent: a possible tag
        self.finished = False

    def push(self, text: str, finished: bool) -> tuple[str, str]:
        """(reasoning piece, content piece) for this new text. `finished`: nothing follows."""
        if self.finished:
            return "", ""
        self.buf += text
        self.finished = finished
        if self.state == "start" and not self._start(finished):
            return "", ""
        pieces = {"reasoning": [], "content": []}
        i = 0
        while True:
            at = self.buf.find("<", i)
            if at < 0:
                pieces[self.state].append(self.buf[i:])
                self.buf = ""
                break
            pieces[self.state].append(self.buf[i:at])
            tag = next((t for t in (_OPEN, _CLOSE) if self.buf.startswith(t, at)), None)
            if tag is None and not finished and any(t.startswith(self.buf[at:]) for t in (_OPEN, _CLOSE)):
                self.buf = self.buf[at:]  # may become a tag: wait for more text
                break
            if tag is None:
                pieces[self.state].append("<")
                i = at + 1
                continue
            if tag == _CLOSE:  # the text right after it, whitespace too, is content (as in vLLM)
                self.state = "content"
            i = at + len(tag)
        return "".join(pieces["reasoning"]), "".join(pieces["content"])

    def _start(self, finished: bool) -> bool:
        """Decide where the output starts; False while it cannot be told yet (held back)."""
        head = self.buf.lstrip()
        if head.startswith(_OPEN):
            self.buf, self.state = head[len(_OPEN) :], "reasoning"
            return True
        if not finished and _OPEN.startswith(head):  # only whitespace, or the start of `<think>`, so far
            return False
        self.state = "reasoning" if self.thinks_first else "content"
        return True


def _check(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"unknown reasoning parser {kind!r}; expected one of {', '.join(_KINDS)}")
