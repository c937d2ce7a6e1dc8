"""Tool calls out of a model's text, incrementally: what goes into a streaming chunk's `content` and
`tool_calls` after each piece of new text, such that any split of the text into pushes adds up to the
same content and calls as one push of the whole (merge_tool_calls gives the non-streaming `tool_calls`).

Formats (make_tool_parser's `kind`):
- "hermes" (Hermes, Qwen2.5, Qwen3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
  among plain text. The content is the output less each block that became a call (from `<tool_call>` to
  its `</tool_call>`, the next `<tool_call>` or the end) and the whitespace right after it. vLLM streams
  the non-blank text after a block as content too (its non-streaming path drops it: we don't). A block
  that is not a call (not JSON, no non-empty string name, arguments not an object) is content, raw.
- "llama3_json" (Llama 3.x): the whole output is `{"name": ..., "parameters": {...}}` calls separated by
  `;`, after an optional `<|python_tag|>`, or else it is all content.
- "required" (tool_choice "required", output held to a JSON schema): a JSON array of such calls.
- "named" (tool_choice naming one function): the whole output is that function's arguments object.

A call's first delta (id, name) goes out once `{"name": "<name>", "arguments": {` has arrived (the "{"
too: arguments that are not an object go the slow way below); from then on the arguments' raw JSON text
streams as it comes, up to the bracket that closes them. Keys in another order hold the call back until
its object ends; then json.loads reads it and the arguments go out re-serialized.
"""

from __future__ import annotations

from collections.abc import Callable
from uuid import uuid4

from nanoserve.engine_pod.tool_call_stream import (  # noqa: F401 - ToolCallDelta, merge_tool_calls: the API
    _END,
    _HEAD,
    _PYTHON_TAG,
    _START,
    _WS,
    ToolCallDelta,
    ToolDelta,
    ToolParser,
    _Brackets,
    _match,
    _partial_tag,
    merge_tool_calls,
)


class HermesParser(ToolParser):
    """`<tool_call>` blocks among text. States: "text", "head" (in a block, the call not started yet),
    "args" (its arguments streaming), "tail" (after the arguments, until `</tool_call>`)."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        super().__init__(new_id)
        self.after_call = False  # whitespace right after a call's block is not content
        self.held = False  # this block cannot stream (keys in another order...): wait for its end
        self.searched = 0  # buf[:searched] holds no `</tool_call>`
        self.brackets = _Brackets()

    def _on_text(self, finished: bool) -> bool:
        if self.after_call:
            self.buf = self.buf.lstrip(_WS)
            self.after_call = not self.buf
        at = self.buf.find(_START)
        if at < 0:
            keep = 0 if finished else _partial_tag(self.buf, _START)
            self._emit_content(self.buf[: len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep :]
            return False
        self._emit_content(self.buf[:at])
        self.buf, self.state, self.held, self.searched = self.buf[at + len(_START) :], "head", False, 0
        return True

    def _on_head(self, finished: bool) -> bool:
        end = self.buf.find(_END, self.searched)
        self.searched = max(0, len(self.buf) - len(_END) + 1) if end < 0 else end
        if not self.held:
            # The head lies before the first `</tool_call>` (it cannot straddle one: it ends in "{").
            verdict, at, name = _match(self.buf[:end] if end >= 0 else self.buf, _HEAD)
            if verdict == "yes":
                assert name is not None  # _HEAD's steps name the function
                self._emit_start(name)
                self.buf, self.state, self.brackets = self.buf[at - 1 :], "args", _Brackets()
                return True
            self.held = verdict == "no"
        if end < 0 and not finished:
            return False
        body = self.buf[:end] if end >= 0 else self.buf  # an unclosed block at the end is read as is
        if self._emit_whole_call(body):
            self.after_call = True
        else:  # not a call: the block is content, raw
            self._emit_content(_START + body + (_END if end >= 0 else ""))
        self.buf, self.state = (self.buf[end + len(_END) :] if end >= 0 else ""), "text"
        return True

    def _on_args(self, finished: bool) -> bool:
        j, why = self.brackets.scan(self.buf, 0, _END, finished)
        self._emit_args(self.buf[:j])
        self.buf = self.buf[j:]
        if why == "end":
            self.state = "tail"
        elif why == "stop":  # `</tool_call>` outside a string before the arguments closed: the call ends
            self.buf, self.state, self.after_call = self.buf[len(_END) :], "text", True
        return why != "more"

    def _on_tail(self, finished: bool) -> bool:
        end, start = self.buf.find(_END), self.buf.find(_START)
        if 0 <= start and (start < end or end < 0):  # a new block without this one's `</tool_call>`
            self.buf, self.state, self.after_call = self.buf[start:], "text", True
            return True
        if end < 0:  # the rest of the call object: nothing to send
            self.buf = self.buf[len(self.buf) - max(_partial_tag(self.buf, _END), _partial_tag(self.buf, _START)) :]
            return False
        self.buf, self.state, self.after_call = self.buf[end + len(_END) :], "text", True
        return True


class JsonCallsParser(ToolParser):
    """Call objects one after another: a JSON array of them ("required"), or `obj; obj` (Llama 3, the
    subclass). At the first thing that is neither a call nor a separator, the rest of the output is
    content, raw: all of it when no call has gone out yet. Whitespace between calls is nobody's."""

    open, sep, close = "[", ",", "]"

    def __init__(self, new_id: Callable[[], str]) -> None:
        super().__init__(new_id)
        self.state = "open"
        self.seen = ""  # the whole output while no call has gone out: the content if none does
        self.pos = 0  # "held": buf[:pos] scanned
        self.brackets = _Brackets()

    def push(self, text: str, finished: bool) -> ToolDelta:
        if self.num_calls == 0:
            self.seen += text
        return super().push(text, finished)

    def _next(self) -> bool:
        """Drop leading whitespace; whether a character follows (else wait for more)."""
        self.buf = self.buf.lstrip(_WS)
        return bool(self.buf)

    def _take(self, prefix: str, state: str) -> bool:
        """Consume `prefix` (a bracket or separator) and go to `state`, if the text starts with it."""
        if not prefix or not self.buf.startswith(prefix):
            return False
        self.buf, self.state = self.buf[len(prefix) :], state
        return True

    def _rest_is_content(self) -> bool:
        self._emit_content(self.seen if self.num_calls == 0 else self.buf)
        self.buf, self.state = "", "content"
        return False

    def _on_content(self, finished: bool) -> bool:
        self._emit_content(self.buf)
        self.buf = ""
        return False

    def _on_open(self, finished: bool) -> bool:
        if not self._next():
            return finished and self._rest_is_content()
        return self._take(self.open, "item") or self._rest_is_content()

    def _on_item(self, finished: bool) -> bool:
        if not self._next():
            return finished and self.num_calls == 0 and self._rest_is_content()
        if self._take(self.close, "done"):  # `[]`, or after a trailing comma
            return True
        if self.buf[0] != "{":
            return self._rest_is_content()
        self.state, self.pos, self.brackets = "head", 0, _Brackets()
        return True

    def _on_head(self, finished: bool) -> bool:
        verdict, at, name = _match(self.buf, _HEAD)
        if verdict == "yes":
            assert name is not None  # _HEAD's steps name the function
            self._emit_start(name)
            self.buf, self.state, self.brackets = self.buf[at - 1 :], "args", _Brackets()
            return True
        if verdict == "maybe" and not finished:
            return False
        self.state = "held"  # read the whole object, then see whether it is a call
        return True

    def _on_held(self, finished: bool) -> bool:
        self.pos, why = self.brackets.scan(self.buf, self.pos)
        if why != "end":
            return finished and self._rest_is_content()
        if not self._emit_whole_call(self.buf[: self.pos]):
            return self._rest_is_content()
        self.buf, self.state = self.buf[self.pos :], "after"
        return True

    def _on_args(self, finished: bool) -> bool:
        j, why = self.brackets.scan(self.buf)
        self._emit_args(self.buf[:j])
        self.buf = self.buf[j:]
        if why != "end":
            return False
        self.state, self.brackets = "tail", _Brackets(depth=1)  # until the call object's own "}"
        return True

    def _on_tail(self, finished: bool) -> bool:
        j, why = self.brackets.scan(self.buf)
        self.buf = self.buf[j:]
        if why != "end":
            return False
        self.state = "after"
        return True

    def _on_after(self, finished: bool) -> bool:
        if not self._next():
            return False
        return self._take(self.sep, "item") or self._take(self.close, "done") or self._rest_is_content()

    def _on_done(self, finished: bool) -> bool:
        return self._next() and self._rest_is_content()


class Llama3JsonParser(JsonCallsParser):
    """`{"name": ...}; {"name": ...}` after an optional `<|python_tag|>`; an output that does not start so
    is all content (decided as soon as it can be: only an undecided start is held back)."""

    open, sep, close = "", ";", ""

    def _on_open(self, finished: bool) -> bool:
        text = self.buf.lstrip(_WS)
        if text.startswith(_PYTHON_TAG):
            text = text[len(_PYTHON_TAG) :]
        elif text and _PYTHON_TAG.startswith(text) and not finished:
            return False
        verdict, _, _ = _match(text, ("{", '"name"', ":"))
        if verdict == "maybe" and not finished:
            return False
        if verdict != "yes":
            return self._rest_is_content()
        self.buf, self.state = text, "item"
        return True


class NamedParser(ToolParser):
    """The whole output is the arguments of `function`: its first delta goes out at once, then the text
    streams raw, less the whitespace at either end (trailing whitespace waits: more text may follow)."""

    def __init__(self, new_id: Callable[[], str], function: str) -> None:
        super().__init__(new_id)
        self.function = function
        self.begun = False  # a non-whitespace character has come

    def _on_text(self, finished: bool) -> bool:
        if self.num_calls == 0:
            self._emit_start(self.function)
        if not self.begun:
            self.buf = self.buf.lstrip(_WS)
            self.begun = bool(self.buf)
        body = self.buf.rstrip(_WS)
        self._emit_args(body)
        self.buf = self.buf[len(body) :]
        return False


def make_tool_parser(
    kind: str, new_id: Callable[[], str] = lambda: f"chatcmpl-tool-{uuid4().hex}", function: str | None = None
) -> ToolParser:
    """A parser for one response: kind "hermes", "llama3_json", "required", or "named" (`function`)."""
    if kind == "named":
        if not function:
            raise ValueError("a 'named' tool parser needs the function's name")
        return NamedParser(new_id, function)
    parsers = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "required": JsonCallsParser}
    if kind not in parsers:
        raise ValueError(f"unknown tool parser {kind!r}; expected one of hermes, llama3_json, required, named")
    return parsers[kind](new_id)
