"""tool_choice as vLLM reads it (engine_pod/tool_choice.py), and tools as part of the prompt: the gateway
renders a tools request to the same ids as the engine, and those ids hold the tools."""

import pytest
from transformers import AutoTokenizer

from nanoserve.common.chat import chat_prompt_ids
from nanoserve.engine_pod.errors import ConfigError, InvalidRequestError
from nanoserve.engine_pod.openai_protocol import parse_chat
from nanoserve.engine_pod.tool_choice import ChatConfig, tool_use
from nanoserve.gateway.prompt import PromptTokenizer

TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}},
}
AUTO = ChatConfig("hermes", True)


def test_choices_map_to_parsers_and_constraints():
    assert tool_use({}, ChatConfig()).parser is None
    assert tool_use({"tools": [TOOL]}, AUTO).parser == "hermes"
    assert tool_use({"tools": [TOOL], "tool_choice": "none"}, AUTO).parser is None
    required = tool_use({"tools": [TOOL], "tool_choice": "required"}, ChatConfig())
    schema = required.constraint.json
    assert required.parser == "required" and schema["minItems"] == 1 and "maxItems" not in schema
    assert schema["items"]["anyOf"][0]["properties"]["parameters"] == TOOL["function"]["parameters"]
    one = tool_use({"tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False}, ChatConfig())
    assert one.constraint.json["maxItems"] == 1 and not one.parallel
    named = tool_use({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}}, ChatConfig())
    assert (named.parser, named.function, named.constraint.json) == ("named", "f", TOOL["function"]["parameters"])


def test_auto_needs_the_flags_as_in_vllm():
    with pytest.raises(InvalidRequestError, match="--enable-auto-tool-choice") as e:
        tool_use({"tools": [TOOL]}, ChatConfig())
    assert e.value.param == "tool_choice"
    with pytest.raises(ConfigError):
        ChatConfig(None, True)
    with pytest.raises(ConfigError):
        ChatConfig("mistral")


@pytest.fixture(scope="module")
def tokenizer(bpe_model):
    return AutoTokenizer.from_pretrained(bpe_model)


def test_the_gateway_renders_tools_requests_to_the_engines_ids(tokenizer):
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [TOOL],
        "tool_choice": "required",
        "chat_template_kwargs": {"enable_thinking": False},
    }
    engine = parse_chat(body, tokenizer, len(tokenizer), 1024, chat=AUTO).prompt_ids
    gateway = PromptTokenizer(tokenizer, "fp", "test").ids("/v1/chat/completions", body)
    assert engine == gateway
    without = chat_prompt_ids(tokenizer, body["messages"])
    assert len(engine) > len(without) and '"name": "f"' in tokenizer.decode(engine)
