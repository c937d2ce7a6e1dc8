"""One streaming tool call at a time: the deltas of OpenAI's `tool_calls`, the JSON scanning that finds a
call's head and the end of its arguments in text that is still arriving, and the base of every format's
parser (tool_parsers.py): a state machine over the unconsumed text."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

_WS = " \t\n\r"  # JSON's whitespace
_STR = None  # a _HEAD step: a JSON string (the name)
# The head of a call object that streams: whitespace may come before each step.
_HEAD = ("{", '"name"', ":", _STR, ",", ('"arguments"', '"parameters"'), ":", "{")
_START, _END, _PYTHON_TAG = "<tool_call>", "</tool_call>", "<|python_tag|>"
_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'  # a character of a JSON string
_STRING = re.compile(f'"{_CHAR}*"')
_STRING_START = re.compile(f'"{_CHAR}*' + r"(?:\\(?:u[0-9a-fA-F]{0,3})?)?")  # may still become a string


@dataclass
class ToolCallDelta:
    """One entry of a streaming delta's `tool_calls`."""

    index: int  # the call's position among this response's calls (0, 1, ...)
    id: str | None = None  # set on the call's first delta only
    name: str | None = None  # set on the call's first delta only
    arguments: str = ""  # a piece of the arguments' JSON text

    def to_openai(self) -> dict:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


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
