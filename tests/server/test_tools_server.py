"""Tool calling and reasoning through a real `nanoserve serve` process with vLLM's flags (--tool-call-parser
hermes --enable-auto-tool-choice --reasoning-parser qwen3) and the official openai client, streamed and not.

The model is random: structured output makes it write real calls. tool_choice "required" and a named
function are forced by the server's own grammar; "auto" is read back by the Hermes parser, from text a
regex makes the model write token by token, so the parser sees real detokenized output."""

import json
import re

import openai
import pytest
from transformers import AutoTokenizer

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "weather in paris?"}]
HERMES = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,6}"\}\}\n</tool_call>'


@pytest.fixture(scope="module")
def client(bpe_server):
    return openai.OpenAI(base_url=f"{bpe_server.url}/v1", api_key="unused", max_retries=0)


def chat(client, stream=False, **kw):
    kw = {"model": "bpe", "messages": ASK, "max_tokens": 200, "temperature": 0, **kw}
    if not stream:
        out = client.chat.completions.create(**kw)
        return out.choices[0].message, out.choices[0].finish_reason
    return streamed(client.chat.completions.create(stream=True, **kw))


def streamed(chunks):
    """The message a client assembles from a stream's deltas (content, reasoning, tool_calls by index)."""
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in chunks:
        choice = chunk.choices[0]
        delta, finish = choice.delta, choice.finish_reason or finish
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning", None) or ""
        for c in delta.tool_calls or []:
            call = calls.setdefault(c.index, {"id": None, "name": None, "arguments": ""})
            if c.id:
                assert call["id"] is None, "a call's id comes once"
                call["id"] = c.id
            if c.function and c.function.name:
                call["name"] = c.function.name
            call["arguments"] += (c.function.arguments or "") if c.function else ""
    return {"content": content, "reasoning": reasoning, "calls": [calls[i] for i in sorted(calls)]}, finish


def calls_of(message):
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]


def test_required_forces_one_valid_call_streamed_and_not(client):
    message, finish = chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert finish == "tool_calls" and message.content is None
    [call] = calls_of(message)
    assert call["id"].startswith("chatcmpl-tool-") and call["name"] in SCHEMAS
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    got, finish = chat(client, stream=True, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert finish == "tool_calls" and got["content"] == ""
    assert [(c["name"], c["arguments"]) for c in got["calls"]] == [(call["name"], call["arguments"])]


def test_a_named_function_gets_its_arguments(client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    for kw in ({"temperature": 0}, {"temperature": 1, "seed": 11}):
        message, finish = chat(client, tools=TOOLS, tool_choice=choice, **kw)
        [call] = calls_of(message)
        assert finish == "stop" and call["name"] == "get_time"
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS["get_time"])
        got, _ = chat(client, stream=True, tools=TOOLS, tool_choice=choice, **kw)
        assert [(c["name"], c["arguments"]) for c in got["calls"]] == [("get_time", call["arguments"])]


def test_auto_reads_hermes_calls_out_of_the_text(client):
    regex = "ok " + HERMES + r"\n" + HERMES
    kw = {"tools": TOOLS, "extra_body": {"guided_regex": regex}}
    message, finish = chat(client, **kw)
    assert finish == "tool_calls" and message.content.strip() == "ok"
    calls = calls_of(message)
    assert [c["name"] for c in calls] == ["get_weather", "get_weather"] and len({c["id"] for c in calls}) == 2
    for c in calls:
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS["get_weather"])
    got, finish = chat(client, stream=True, **kw)
    assert finish == "tool_calls" and got["content"].strip() == "ok"
    assert [(c["name"], c["arguments"]) for c in got["calls"]] == [(c["name"], c["arguments"]) for c in calls]
    one, _ = chat(client, parallel_tool_calls=False, **kw)
    assert calls_of(one)[0]["arguments"] == calls[0]["arguments"] and len(one.tool_calls) == 1
    plain, finish = chat(client, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert plain.tool_calls is None and finish == "length"


def test_reasoning_apart_from_content_streamed_and_not(client):
    kw = {"extra_body": {"guided_regex": r"<think>\n[a-z]{1,10}\n</think>\n\n[a-z]{1,10}"}}
    message, finish = chat(client, **kw)
    assert finish == "stop" and "<think>" not in message.content + message.reasoning
    assert re.fullmatch("[a-z]{1,10}", message.reasoning.strip())
    assert re.fullmatch("[a-z]{1,10}", message.content.strip())
    assert message.model_extra["reasoning_content"] == message.reasoning
    got, _ = chat(client, stream=True, **kw)
    assert (got["reasoning"], got["content"]) == (message.reasoning, message.content)
    plain, _ = chat(client, max_tokens=5)
    assert plain.reasoning is None  # no <think>: all content


def test_history_with_calls_and_results_renders_through_the_template(client, bpe_model):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "paris"}'}}
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = client.chat.completions.create(model="bpe", messages=history, tools=TOOLS, max_tokens=1)
    tok = AutoTokenizer.from_pretrained(bpe_model)
    rendered = tok.apply_chat_template(
        history[:1]
        + [
            {
                **history[1],
                "content": "",
                "tool_calls": [{**call, "function": {"name": "get_weather", "arguments": {"city": "paris"}}}],
            },
            history[2],
        ],
        tools=TOOLS,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}' in rendered
    assert "<tool_response>\nsunny" in rendered
    assert out.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))
    on = client.chat.completions.create(model="bpe", messages=ASK, max_tokens=1)
    off = client.chat.completions.create(
        model="bpe", messages=ASK, max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    empty_think = len(tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False))
    assert off.usage.prompt_tokens - on.usage.prompt_tokens == empty_think


BAD_TOOL = {"type": "function", "function": {"parameters": {"type": "object"}}}
BAD_SCHEMA = {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"tools": [BAD_TOOL]}, "tools[0].function.name"),
        ({"tools": [WEATHER, {"type": "retrieval"}]}, "tools[1]"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": [BAD_SCHEMA], "tool_choice": "required"}, "tools"),
        (
            {"tools": [BAD_SCHEMA], "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tools[0].function.parameters",
        ),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]},
            "messages[0].tool_calls[0]",
        ),
        ({"extra_body": {"chat_template_kwargs": {"tokenize": True}}}, "chat_template_kwargs"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": "bpe", "messages": ASK, "max_tokens": 5, **kw})
    assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:  # tools are for chat
        client.completions.create(model="bpe", prompt="x", max_tokens=5, extra_body={"tools": TOOLS})
    assert e.value.body["param"] == "tools"
