"""Tool calls out of model text: exact OpenAI `tool_calls` for each format; any split of an output into
pushes gives the same content and calls as one push; and nothing is lost or invented: on outputs built
from known parts the content and calls are exactly the parts', and on random text soups the content is
made of the output's own characters, in order."""

import itertools
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoserve.engine_pod.tool_parsers import ToolCallDelta, ToolDelta, make_tool_parser, merge_tool_calls

WS = " \t\n\r"
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "n": [1, {"a": "}"}]}}'
CASES = settings(max_examples=200, deadline=None)


def parser(kind: str, function: str | None = None):
    ids = itertools.count()
    return make_tool_parser(kind, lambda: f"call_{next(ids)}", function)


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0] + sorted(c % (len(text) + 1) for c in cuts) + [len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def run(kind: str, pieces: list[str], function: str | None = None) -> tuple[str, list[dict], list[ToolDelta]]:
    """(content, merged tool_calls, the deltas) for these pushes, the last one finished."""
    p, pieces = parser(kind, function), pieces or [""]
    deltas = [p.push(piece, i == len(pieces) - 1) for i, piece in enumerate(pieces)]
    assert p.push("more", True) == ToolDelta()  # nothing after the end
    flat = [t for d in deltas for t in d.tool_calls]
    started: set[int] = set()
    for t in flat:  # a call's first delta (id and name) comes before any piece of its arguments
        first = t.index not in started
        assert (t.id is not None) == first and (t.name is not None) == first
        if first:
            assert t.index == len(started)  # calls are numbered 0, 1, ... in order
            started.add(t.index)
    return "".join(d.content for d in deltas), merge_tool_calls(flat), deltas


def once(kind: str, text: str, function: str | None = None) -> tuple[str, list[dict]]:
    return run(kind, [text], function)[:2]


def call(i: int, name: str, arguments: str) -> dict:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


def block(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


# -- goldens ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, text, content, calls",
    [
        ("hermes", "The capital of France is Paris.", "The capital of France is Paris.", []),
        ("hermes", block(WEATHER), "", [call(0, "get_weather", '{"city": "Paris", "n": [1, {"a": "}"}]}')]),
        (
            "hermes",
            "Let me look both up.\n\n"
            + block('{"name": "a", "arguments": {"x": 1}}')
            + "\n"
            + block('{"name": "b", "arguments": {}}')
            + "\n",
            "Let me look both up.\n\n",
            [call(0, "a", '{"x": 1}'), call(1, "b", "{}")],
        ),
        (
            "hermes",
            block('{"name": "w\\"x", "arguments": {"q": "a}b\\"}{", "d": {"e": [{}, "]"]}}}'),
            "",
            [call(0, 'w"x', '{"q": "a}b\\"}{", "d": {"e": [{}, "]"]}}')],
        ),
        (
            "hermes",
            block('{"arguments": {"city": "Z\\u00fcrich"}, "name": "get_weather"}'),
            "",
            [call(0, "get_weather", '{"city": "Zürich"}')],
        ),
        (
            "hermes",
            'ok <tool_call>{"name": "f", "parameters": {"x": 1}}</tool_call> done',
            "ok done",
            [call(0, "f", '{"x": 1}')],
        ),
        ("hermes", "a " + block("not json") + " b", "a " + block("not json") + " b", []),
        ("hermes", block('{"name": "f", "arguments": [1]}'), block('{"name": "f", "arguments": [1]}'), []),
        ("hermes", 'x <tool_call>{"name": "f", "argu', 'x <tool_call>{"name": "f", "argu', []),
        ("hermes", '<tool_call>{"name": "f", "arguments": {"a": "b', "", [call(0, "f", '{"a": "b')]),
        ("hermes", '<tool_call>{"arguments": {}, "name": "f"}', "", [call(0, "f", "{}")]),
        ("hermes", "1 < 2 and <tool <tool_c", "1 < 2 and <tool <tool_c", []),
        # Once the arguments stream, only a </tool_call> outside their strings ends the block ...
        (
            "hermes",
            '<tool_call>{"name": "f", "arguments": {"a": "</tool_call>"}}</tool_call>',
            "",
            [call(0, "f", '{"a": "</tool_call>"}')],
        ),
        (
            "hermes",
            '<tool_call>{"name": "f", "arguments": {"a": 1</tool_call> after',
            "after",
            [call(0, "f", '{"a": 1')],
        ),
        (
            "hermes",
            '<tool_call>{"name": "a", "arguments": {}}\n<tool_call>{"name": "b", "arguments": {}}</tool_call>',
            "",
            [call(0, "a", "{}"), call(1, "b", "{}")],
        ),  # a call's block may end where the next one starts
        # ... before that, the first </tool_call> does, even inside a string.
        (
            "hermes",
            '<tool_call>{"name": "f</tool_call>", "arguments": {}}</tool_call>',
            '<tool_call>{"name": "f</tool_call>", "arguments": {}}</tool_call>',
            [],
        ),
        (
            "llama3_json",
            '<|python_tag|>{"name": "a", "parameters": {"x": [1, 2]}}; {"name": "b", "arguments": {}}',
            "",
            [call(0, "a", '{"x": [1, 2]}'), call(1, "b", "{}")],
        ),
        (
            "llama3_json",
            '\n{"name": "a", "parameters": {"x": 1}} ;\n{"parameters": {"y": "é"}, "name": "b"}',
            "",
            [call(0, "a", '{"x": 1}'), call(1, "b", '{"y": "é"}')],
        ),
        ("llama3_json", '{"answer": 42, "unit": "km"}', '{"answer": 42, "unit": "km"}', []),
        ("llama3_json", '{"name": "Ada", "born": 1815}', '{"name": "Ada", "born": 1815}', []),
        ("llama3_json", 'Sure: {"name": 1}', 'Sure: {"name": 1}', []),
        ("llama3_json", '{"name": "a", "parameters": {}}\n\nDone.', "Done.", [call(0, "a", "{}")]),
        (
            "required",
            '[{"name": "a", "parameters": {"x": "}]"}}, {"name": "b", "parameters": {}}]',
            "",
            [call(0, "a", '{"x": "}]"}'), call(1, "b", "{}")],
        ),
        ("required", " [ ] ", "", []),
        (
            "named",
            ' \n{"city": "Paris", "days": [1, 2]}\n ',
            "",
            [call(0, "get_weather", '{"city": "Paris", "days": [1, 2]}')],
        ),
    ],
)
def test_golden(kind, text, content, calls):
    function = "get_weather" if kind == "named" else None
    assert once(kind, text, function) == (content, calls)
    assert run(kind, list(text), function)[:2] == (content, calls)  # a character at a time


def test_streaming_golden_hermes():
    first, args = ToolCallDelta(0, "call_0", "f", ""), lambda text: ToolCallDelta(0, arguments=text)
    steps = [  # (pushed text, what goes out)
        ("Hi<too", ToolDelta("Hi")),  # "<too" is held back: it may be the start of <tool_call>
        ("l_call", ToolDelta()),
        ('>\n{"na', ToolDelta()),  # the head: no name yet
        ('me": "', ToolDelta()),
        ('f", "a', ToolDelta()),
        ("rgumen", ToolDelta()),
        ('ts": {', ToolDelta("", [first, args("{")])),  # the name, then the arguments as they come
        ('"a": "', ToolDelta("", [args('"a": "')])),
        ('}"}}\n<', ToolDelta("", [args('}"}')])),  # the call object's own "}" is not arguments
        ("/tool_", ToolDelta()),
        ("call>", ToolDelta()),
    ]
    content, calls, deltas = run("hermes", [text for text, _ in steps])
    assert deltas == [want for _, want in steps]
    assert (content, calls) == ("Hi", [call(0, "f", '{"a": "}"}')])


def test_to_openai():
    assert ToolCallDelta(1, "call_9", "f").to_openai() == {
        "index": 1,
        "id": "call_9",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    assert ToolCallDelta(1, arguments='{"a"').to_openai() == {"index": 1, "function": {"arguments": '{"a"'}}


def test_default_ids_and_bad_kinds():
    d = make_tool_parser("hermes").push(block(WEATHER), True)
    assert d.tool_calls[0].id.startswith("chatcmpl-tool-") and len(d.tool_calls[0].id) == 14 + 32
    with pytest.raises(ValueError):
        make_tool_parser("mistral")
    with pytest.raises(ValueError):
        make_tool_parser("named")


# -- any split is one push; nothing lost or invented --------------------------------------------------

SOUP = [
    "<tool_call>",
    "</tool_call>",
    WEATHER,
    '{"name": "f", "arguments": ',
    '{"arguments": {"x": 1}, "name": "g"}',
    '{"name": "h", "parameters": {"q": "a;b"}}',
    '\\"',
    '"',
    "{",
    "}",
    "[",
    "]",
    '"}"',
    "hello",
    "world",
    "<",
    "<tool",
    "</tool_c",
    " ",
    "\n",
    "\t",
    "é",
    "日本",
    "🙂",
    ";",
    ",",
    ":",
    "<|python_tag|>",
    "\\",
    "1",
]
soups = st.lists(st.sampled_from(SOUP), max_size=25).map("".join)
cuts = st.lists(st.integers(0, 10_000), max_size=12)


def is_subsequence(small: str, big: str) -> bool:
    chars = iter(big)
    return all(c in chars for c in small)


@CASES
@given(text=soups, cut=cuts, kind=st.sampled_from(["hermes", "llama3_json", "required", "named"]))
def test_any_split_is_one_push(text, cut, kind):
    function = "f" if kind == "named" else None
    content, calls, _ = run(kind, split(text, cut), function)
    assert (content, calls) == once(kind, text, function)
    if kind == "hermes":
        assert is_subsequence(content, text)
        if "<tool_call>" not in text:
            assert content == text and calls == []
        assert len(calls) <= text.count("<tool_call>")
    elif kind == "named":
        assert content == "" and calls == [call(0, "f", text.strip(WS))]
    else:  # the content, if any, is the rest of the output from where the calls stopped
        assert text.endswith(content)


names = st.sampled_from(["get_weather", 'say "hi"', "naïve", "back\\slash", "f"])
leaves = st.none() | st.booleans() | st.integers(-99, 99) | st.text(alphabet='ab }{][":,\\/<>é\n', max_size=8)
values = st.recursive(
    leaves,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text('xyz}"', max_size=3), kids, max_size=3),
    max_leaves=8,
)
arguments = st.dictionaries(st.text('abc{"', max_size=4), values, max_size=4)
spaces = st.text(alphabet=WS, max_size=2)


@st.composite
def call_object(draw, keys=("arguments", "parameters")) -> tuple[str, str, str]:
    """(object text, name, arguments text the parser reports): name first streams the arguments' raw
    text; another order is read whole and the arguments re-serialized."""
    name, args, key = draw(names), draw(arguments), draw(st.sampled_from(keys))
    raw_args = json.dumps(
        args,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 1])),
        separators=draw(st.sampled_from([(", ", ": "), (",", ":")])),
    )
    if draw(st.booleans()):
        s = [draw(spaces) for _ in range(8)]
        text = (
            f'{s[0]}{{{s[1]}"name"{s[2]}:{s[3]}{json.dumps(name)}{s[4]},{s[5]}"{key}"{s[6]}:{s[7]}{raw_args}'
            f"{draw(spaces)}}}"
        )
        return text, name, raw_args
    return json.dumps({key: args, "name": name}), name, json.dumps(args, ensure_ascii=False)


TEXT = ["Let me check.", " ", "\n", "hello", "<", "<tool", "</tool_call>", "{", "}", '"', "é🙂", "a < b", ">"]
NOT_CALLS = [
    "",
    "not json",
    '{"name": "f"}',
    '{"name": 3, "arguments": {}}',
    '{"name": "f", "arguments": [1]}',
    '{"name": "f", "arguments": "{}"}',
    '{"name": "", "arguments": {}}',
    "[1, 2]",
    '{"arguments": {}} x',
]


@st.composite
def hermes_output(draw) -> tuple[str, str, list[dict]]:
    """An output made of text, call blocks and blocks that are not calls, with its content and calls."""
    text, content, calls, after_call = "", "", [], False
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["text", "text", "call", "not a call"]))
        if kind == "text":
            piece = "".join(draw(st.lists(st.sampled_from(TEXT), min_size=1, max_size=4)))
            text += piece
            kept = piece.lstrip(WS) if after_call else piece  # whitespace right after a call is dropped
            after_call, content = after_call and not kept, content + kept
        elif kind == "call":
            obj, name, args = draw(call_object())
            text += f"<tool_call>{draw(spaces)}{obj}{draw(spaces)}</tool_call>"
            calls.append(call(len(calls), name, args))
            after_call = True
        else:
            raw = f"<tool_call>{draw(spaces)}{draw(st.sampled_from(NOT_CALLS))}{draw(spaces)}</tool_call>"
            text, content, after_call = text + raw, content + raw, False
    ending = draw(st.sampled_from(["", "unclosed call", "cut in the arguments", "cut in the head"]))
    if ending == "unclosed call":  # no </tool_call>: the object is read as it is
        obj, name, args = draw(call_object())
        text += "<tool_call>" + obj
        calls.append(call(len(calls), name, args))
    elif ending == "cut in the arguments":  # a call whose name was out: it stays a call, cut short
        text += '<tool_call>{"name": "f", "arguments": {"city": "Par'
        calls.append(call(len(calls), "f", '{"city": "Par'))
    elif ending == "cut in the head":  # never a call: content, raw
        text += '<tool_call>{"name": "f", "argum'
        content += '<tool_call>{"name": "f", "argum'
    return text, content, calls


@CASES
@given(output=hermes_output(), cut=cuts)
def test_hermes_content_and_calls_are_the_parts(output, cut):
    text, content, calls = output
    if text.count("<tool_call>") != len(calls) + content.count("<tool_call>"):
        return  # text pieces happened to spell a tag
    assert run("hermes", split(text, cut))[:2] == (content, calls)


@CASES
@given(
    objs=st.lists(call_object(), max_size=4),
    seps=st.lists(spaces, min_size=10, max_size=10),
    cut=cuts,
    tag=st.booleans(),
    rest=st.sampled_from(["", "Done.", "x {"]),
)
def test_json_calls_are_the_parts(objs, seps, cut, tag, rest):
    want = [call(i, name, args) for i, (_, name, args) in enumerate(objs)]
    required = "[" + seps[0] + f"{seps[1]},{seps[2]}".join(o for o, _, _ in objs) + seps[3] + "]" + seps[4] + rest
    assert run("required", split(required, cut))[:2] == (rest if objs or not rest else required, want)
    if objs:  # Llama: calls only when the output starts with {"name":
        llama = seps[5] + "<|python_tag|>" * tag + f"{seps[6]};{seps[7]}".join(o for o, _, _ in objs) + seps[8] + rest
        calls = re.match(r'\s*\{\s*"name"', objs[0][0]) is not None
        assert run("llama3_json", split(llama, cut))[:2] == ((rest, want) if calls else (llama, []))


@CASES
@given(args=arguments, pad=st.tuples(spaces, spaces), cut=cuts)
def test_named_streams_the_arguments_raw(args, pad, cut):
    raw = json.dumps(args, ensure_ascii=False)
    content, calls, deltas = run("named", split(pad[0] + raw + pad[1], cut), "get_weather")
    assert (content, calls) == ("", [call(0, "get_weather", raw)])
    assert deltas[0].tool_calls[0] == ToolCallDelta(0, "call_0", "get_weather", "")  # before any argument text
