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

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import uuid4

_WS = " \t\n\r"  # JSON's whitespace
_STR = None  # a _HEAD step: a JSON string (the name)
# The head of a call object that streams: whitespace may come before each step.
_HEAD = ("{", '"name"', ":", _STR, ",", ('"arguments"', '"parameters"'), ":", "{")
_START, _END, _PYTHON_TAG = "<tool_call>", "</tool_call>", "<|python_tag|>"
_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'  # a character of a JSON string
_STRING = re.compile(f'"{_CHAR}*"')
_STRING_START = re.compile(f'"{_CHAR}*' + r'(?:\\(?:u[0-9a-fA-F]{0,3})?)?')  # may still become a string


@dataclass
class ToolCallDelta:
    """One entry of a streaming delta's `tool_calls`."""
    index: int                # the call's position among this response's calls (0, 1, ...)
    id: str | None = None     # set on the call's first delta only
    name: str | None = None   # set on the call's first delta only
    arguments: str = ""       # a piece of the arguments' JSON text

    def to_openai(self) -> dict:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolDelta:
    content: str = ""  # plain text for `content`
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


def merge_tool_calls(deltas: list[ToolCallDelta]) -> list[dict]:
    """The non-streaming OpenAI `tool_calls` that these deltas add up to, in index order."""
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": None, "type": "function", "function": {"name": None, "arguments": ""}})
        if d.id is not None:
            call["id"], call["function"]["name"] = d.id, d.name
        call["function"]["arguments"] += d.arguments
    return [calls[i] for i in sorted(calls)]


def _as_call(text: str) -> tuple[str, str] | None:
    """(name, arguments JSON) when `text` is a call object: a non-empty string name, object arguments."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    name, args = obj.get("name"), obj["arguments"] if "arguments" in obj else obj.get("parameters")
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return name, json.dumps(args, ensure_ascii=False)


def _match(text: str, steps: tuple) -> tuple[str, int, str | None]:
    """Match `steps` (literals, tuples of alternatives, _STR) at the start of `text`, whitespace allowed
    before each: ("yes", end, name), ("maybe", ...) when the text ends first (more may match), or ("no", ...).
    A decided answer never changes as text is appended: that makes the result independent of the split."""
    i, name = 0, None
    for step in steps:
        while i < len(text) and text[i] in _WS:
            i += 1
        if i == len(text):
            return "maybe", i, name
        if step is _STR:
            string = _STRING.match(text, i)
            if string is None:
                return ("maybe" if _STRING_START.fullmatch(text, i) else "no"), i, name
            name, i = json.loads(string.group()), string.end()
            if not name:
                return "no", i, name
            continue
        alts = step if isinstance(step, tuple) else (step,)
        lit = next((a for a in alts if text.startswith(a, i)), None)
        if lit is None:
            return ("maybe" if any(a.startswith(text[i:]) for a in alts) else "no"), i, name
        i += len(lit)
    return "yes", i, name


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper start of `tag` (held back: it may grow)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class _Brackets:
    """Where a JSON value ends, across pieces of text: bracket depth outside strings (escapes skipped)."""

    def __init__(self, depth: int = 0) -> None:
        self.depth, self.in_str, self.esc = depth, False, False

    def scan(self, text: str, i: int = 0, stop: str | None = None, finished: bool = False) -> tuple[int, str]:
        """Read text from i: (j, "end") when the bracket before j closed the value, (j, "stop") when `stop`
        begins at j outside a string, else (j, "more"): j is where to go on from once more text has come."""
        for j in range(i, len(text)):
            c = text[j]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
            elif c == '"':
                self.in_str = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return j + 1, "end"
            elif stop and c == stop[0]:
                if text.startswith(stop, j):
                    return j, "stop"
                if not finished and stop.startswith(text[j:]):
                    return j, "more"
        return len(text), "more"


class ToolParser:
    """One per response. A subclass is a small state machine: `_on_<state>` reads the unconsumed text in
    `buf` and says whether to go on (it changed state) or wait for more text; it reports through
    `_emit_content`, `_emit_start` (a call's first delta) and `_emit_args`."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        self.new_id = new_id
        self.state = "text"
        self.buf = ""
        self.num_calls = 0
        self.finished = False
        self.out = ToolDelta()  # what this push sends

    def push(self, text: str, finished: bool) -> ToolDelta:
        """What to send for this new text of the model's output. `finished`: nothing follows."""
        if self.finished:
            return ToolDelta()
        self.out, self.buf, self.finished = ToolDelta(), self.buf + text, finished
        while getattr(self, "_on_" + self.state)(finished):
            pass
        return self.out

    def _on_text(self, finished: bool) -> bool:
        raise NotImplementedError  # a subclass reads the text

    def _emit_content(self, text: str) -> None:
        self.out.content += text

    def _emit_start(self, name: str) -> None:
        self.out.tool_calls.append(ToolCallDelta(self.num_calls, self.new_id(), name))
        self.num_calls += 1

    def _emit_args(self, text: str) -> None:
        calls = self.out.tool_calls
        if not text:
            return
        if calls and calls[-1].id is None and calls[-1].index == self.num_calls - 1:
            calls[-1].arguments += text  # one arguments piece per call and push
        else:
            calls.append(ToolCallDelta(self.num_calls - 1, arguments=text))

    def _emit_whole_call(self, text: str) -> bool:
        """Report `text` as one call (first delta, then all its arguments) if it is one; whether it was."""
        call = _as_call(text)
        if call is not None:
            self._emit_start(call[0])
            self._emit_args(call[1])
        return call is not None


class HermesParser(ToolParser):
    """`<tool_call>` blocks among text. States: "text", "head" (in a block, the call not started yet),
    "args" (its arguments streaming), "tail" (after the arguments, until `</tool_call>`)."""

    def __init__(self, new_id: Callable[[], str]) -> None:
        super().__init__(new_id)
        self.after_call = False  # whitespace right after a call's block is not content
        self.held = False        # this block cannot stream (keys in another order...): wait for its end
        self.searched = 0        # buf[:searched] holds no `</tool_call>`
        self.brackets = _Brackets()

    def _on_text(self, finished: bool) -> bool:
        if self.after_call:
            self.buf = self.buf.lstrip(_WS)
            self.after_call = not self.buf
        at = self.buf.find(_START)
        if at < 0:
            keep = 0 if finished else _partial_tag(self.buf, _START)
            self._emit_content(self.buf[:len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep:]
            return False
        self._emit_content(self.buf[:at])
        self.buf, self.state, self.held, self.searched = self.buf[at + len(_START):], "head", False, 0
        return True

    def _on_head(self, finished: bool) -> bool:
        end = self.buf.find(_END, self.searched)
        self.searched = max(0, len(self.buf) - len(_END) + 1) if end < 0 else end
        if not self.held:
            # The head lies before the first `</tool_call>` (it cannot straddle one: it ends in "{").
            verdict, at, name = _match(self.buf[:end] if end >= 0 else self.buf, _HEAD)
            if verdict == "yes":
                self._emit_start(name)
                self.buf, self.state, self.brackets = self.buf[at - 1:], "args", _Brackets()
                return True
            self.held = verdict == "no"
        if end < 0 and not finished:
            return False
        body = self.buf[:end] if end >= 0 else self.buf  # an unclosed block at the end is read as is
        if self._emit_whole_call(body):
            self.after_call = True
        else:  # not a call: the block is content, raw
            self._emit_content(_START + body + (_END if end >= 0 else ""))
        self.buf, self.state = (self.buf[end + len(_END):] if end >= 0 else ""), "text"
        return True

    def _on_args(self, finished: bool) -> bool:
        j, why = self.brackets.scan(self.buf, 0, _END, finished)
        self._emit_args(self.buf[:j])
        self.buf = self.buf[j:]
        if why == "end":
            self.state = "tail"
        elif why == "stop":  # `</tool_call>` outside a string before the arguments closed: the call ends
            self.buf, self.state, self.after_call = self.buf[len(_END):], "text", True
        return why != "more"

    def _on_tail(self, finished: bool) -> bool:
        end, start = self.buf.find(_END), self.buf.find(_START)
        if 0 <= start and (start < end or end < 0):  # a new block without this one's `</tool_call>`
            self.buf, self.state, self.after_call = self.buf[start:], "text", True
            return True
        if end < 0:  # the rest of the call object: nothing to send
            self.buf = self.buf[len(self.buf) - max(_partial_tag(self.buf, _END), _partial_tag(self.buf, _START)):]
            return False
        self.buf, self.state, self.after_call = self.buf[end + len(_END):], "text", True
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
        self.pos = 0    # "held": buf[:pos] scanned
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
        self.buf, self.state = self.buf[len(prefix):], state
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
            self._emit_start(name)
            self.buf, self.state, self.brackets = self.buf[at - 1:], "args", _Brackets()
            return True
        if verdict == "maybe" and not finished:
            return False
        self.state = "held"  # read the whole object, then see whether it is a call
        return True

    def _on_held(self, finished: bool) -> bool:
        self.pos, why = self.brackets.scan(self.buf, self.pos)
        if why != "end":
            return finished and self._rest_is_content()
        if not self._emit_whole_call(self.buf[:self.pos]):
            return self._rest_is_content()
        self.buf, self.state = self.buf[self.pos:], "after"
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
            text = text[len(_PYTHON_TAG):]
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
        self.buf = self.buf[len(body):]
        return False


def make_tool_parser(kind: str, new_id: Callable[[], str] = lambda: f"chatcmpl-tool-{uuid4().hex}",
                     function: str | None = None) -> ToolParser:
    """A parser for one response: kind "hermes", "llama3_json", "required", or "named" (`function`)."""
    if kind == "named":
        if not function:
            raise ValueError("a 'named' tool parser needs the function's name")
        return NamedParser(new_id, function)
    parsers = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "required": JsonCallsParser}
    if kind not in parsers:
        raise ValueError(f"unknown tool parser {kind!r}; expected one of hermes, llama3_json, required, named")
    return parsers[kind](new_id)
