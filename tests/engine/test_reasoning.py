"""Reasoning apart from content: exact splits for Qwen3 and DeepSeek-R1 outputs; partial tags held back
across pushes; any split of an output into pushes gives what one push does, and that is the output less
its tags, cut at the first `</think>` (checked against a direct reading of the rule)."""

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoserve.engine_pod.reasoning import ReasoningParser, prompt_opens_thinking


def run(kind: str, pieces: list[str], open_in_prompt: bool = False) -> tuple[str, str]:
    p, pieces = ReasoningParser(kind, open_in_prompt), pieces or [""]
    outs = [p.push(piece, i == len(pieces) - 1) for i, piece in enumerate(pieces)]
    assert p.push("more", True) == ("", "")  # nothing after the end
    return "".join(r for r, _ in outs), "".join(c for _, c in outs)


@pytest.mark.parametrize(
    "kind, open_in_prompt, text, reasoning, content",
    [
        # Qwen3 thinking: the whitespace after each tag stays where it is (vLLM strips none).
        ("qwen3", False, "<think>\nThe user greets.\n</think>\n\nHello!", "\nThe user greets.\n", "\n\nHello!"),
        ("qwen3", False, "\n<think>a</think>b", "a", "b"),
        # Qwen3 with enable_thinking false (an empty think block in the prompt): all content.
        ("qwen3", False, "Hello! 1 < 2.", "", "Hello! 1 < 2."),
        ("qwen3", False, "Hello <think>x</think> there", "", "Hello x there"),
        # Qwen3-2507 thinking: the template opened <think>; the model writes only </think>.
        ("qwen3", True, "Let me think.</think>\n\nIt is 4.", "Let me think.", "\n\nIt is 4."),
        ("qwen3", True, "<think>x</think>y", "x", "y"),
        # DeepSeek-R1: reasoning from the start, with or without the model's own <think>.
        ("deepseek_r1", False, "Hmm.\n</think>\n\n42", "Hmm.\n", "\n\n42"),
        ("deepseek_r1", False, "<think>\nHmm.</think>42", "\nHmm.", "42"),
        ("deepseek_r1", False, "  plain", "  plain", ""),
        # Thinking cut off by the end of the output stays reasoning.
        ("qwen3", False, "<think>still going", "still going", ""),
        ("deepseek_r1", False, "still going <thi", "still going <thi", ""),
        # Tags are markup everywhere; what only looks like one is text.
        ("deepseek_r1", False, "a<think>b</think>c</think>d<think>e", "ab", "cde"),
        ("qwen3", False, "<think>x < y, <th>, </thinker></think>", "x < y, <th>, </thinker>", ""),
        ("qwen3", False, "", "", ""),
        ("qwen3", False, " \n", "", " \n"),
    ],
)
def test_golden(kind, open_in_prompt, text, reasoning, content):
    assert run(kind, [text], open_in_prompt) == (reasoning, content)
    assert run(kind, list(text), open_in_prompt) == (reasoning, content)  # a character at a time


def test_partial_tags_are_held_back():
    p = ReasoningParser("qwen3")
    assert p.push(" <thi", False) == ("", "")  # could still be <think>
    assert p.push("nk>I see</thi", False) == ("I see", "")
    assert p.push("nk>\n\nYes <", False) == ("", "\n\nYes ")
    assert p.push("b>", False) == ("", "<b>")  # "<b" was no tag after all
    assert p.push(" </th", True) == ("", " </th")  # the end: nothing more can come


@pytest.mark.parametrize(
    "prompt, kind, opened",
    [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n", "qwen3", True),  # Qwen3-2507 thinking
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "qwen3", False),  # enable_thinking: false
        ("<|im_start|>user\nWhat is <think>?<|im_end|>\n<|im_start|>assistant\n", "qwen3", False),
        ("<｜User｜>Hi<｜Assistant｜><think>\n", "deepseek_r1", True),
        ("<｜User｜>Hi<｜Assistant｜>", "deepseek_r1", False),
    ],
)
def test_prompt_opens_thinking(prompt, kind, opened):
    assert prompt_opens_thinking(prompt, kind) is opened


def test_unknown_kind():
    with pytest.raises(ValueError):
        ReasoningParser("o1")
    with pytest.raises(ValueError):
        prompt_opens_thinking("", "o1")


def by_the_rule(kind: str, text: str, open_in_prompt: bool) -> tuple[str, str]:
    """The split read directly off the whole text: a leading `<think>` (after whitespace) opens thinking,
    as the start of the output does for deepseek_r1 or an open prompt; every tag is dropped in one pass
    from the left; the first `</think>` ends the reasoning."""
    lead = re.match(r"\s*<think>", text)
    thinking = bool(lead) or kind == "deepseek_r1" or open_in_prompt
    parts = {"r": "", "c": ""}
    for piece in re.split(r"(</?think>)", text[lead.end() :] if lead else text):
        if piece == "</think>":
            thinking = False
        elif piece != "<think>":
            parts["r" if thinking else "c"] += piece
    return parts["r"], parts["c"]


SOUP = [
    "<think>",
    "</think>",
    "<",
    "<th",
    "</thi",
    "think>",
    ">",
    "/",
    "hello",
    "42",
    " ",
    "\n",
    "\t",
    "é",
    "日本",
    "🙂",
    "<tool_call>",
]


@settings(max_examples=200, deadline=None)
@given(
    words=st.lists(st.sampled_from(SOUP), max_size=25),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    kind=st.sampled_from(["qwen3", "deepseek_r1"]),
    open_in_prompt=st.booleans(),
)
def test_any_split_is_one_push(words, cuts, kind, open_in_prompt):
    text = "".join(words)
    bounds = [0] + sorted(c % (len(text) + 1) for c in cuts) + [len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert (
        run(kind, pieces, open_in_prompt)
        == run(kind, [text], open_in_prompt)
        == by_the_rule(kind, text, open_in_prompt)
    )
