"""A chat request's tool use, as vLLM reads it: whether the model may or must call the request's tools, and
how its output is read back.

- `tool_choice: "none"`: the tools are in the prompt, the output is content.
- `"auto"` (the default with tools): the model decides; the server's --tool-call-parser reads its own call
  format (Hermes/Qwen `<tool_call>`, Llama 3 JSON) out of the text. Needs --enable-auto-tool-choice.
- `"required"`: structured output forces a JSON array of `{"name", "parameters"}` calls, one or more
  (exactly one with `parallel_tool_calls: false`).
- `{"type": "function", "function": {"name": ...}}`: structured output forces that function's arguments.
"""

from dataclasses import dataclass

from nanoserve.common.chat import template_tools
from nanoserve.engine_pod.errors import ConfigError, InvalidRequestError
from nanoserve.engine_pod.structured_params import StructuredOutputsParams

TOOL_CALL_PARSERS = ("hermes", "llama3_json")
REASONING_PARSERS = ("qwen3", "deepseek_r1")


@dataclass(frozen=True)
class ChatConfig:
    """The server's chat options, under vLLM's flag names."""

    tool_call_parser: str | None = None  # --tool-call-parser: how "auto" tool calls are read from the text
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice: let the model decide (tool_choice "auto")
    reasoning_parser: str | None = None  # --reasoning-parser: reasoning apart from content
    chat_template: str | None = None  # --chat-template: the Jinja template's text, in place of the model's

    def __post_init__(self):
        if self.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
            raise ConfigError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ConfigError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser")


@dataclass(frozen=True)
class ToolUse:
    parser: str | None  # tool_parsers.make_tool_parser's kind; None: the output is content
    function: str | None = None  # the function tool_choice names
    constraint: StructuredOutputsParams | None = None  # what "required" and a named function force
    parallel: bool = True  # parallel_tool_calls: more than one call per response


def tool_use(body: dict, config: ChatConfig) -> ToolUse:
    """The tool use a chat request body asks for. Raises InvalidRequestError naming the field."""
    tools = template_tools(body.get("tools")) or []
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequestError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    parallel = parallel is not False
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequestError("'tool_choice' is only allowed when 'tools' are given", "tool_choice")
        return ToolUse(None)
    if choice is None or choice == "auto":
        if not config.enable_auto_tool_choice:
            raise InvalidRequestError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                'to be set (or send tool_choice "required", "none" or a named function)',
                "tool_choice",
            )
        return ToolUse(config.tool_call_parser, parallel=parallel)
    if choice == "none":
        return ToolUse(None)
    params = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    if choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, schema in params.items()
        ]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}} | ({} if parallel else {"maxItems": 1})
        return ToolUse("required", constraint=_forced(array, "tools"), parallel=parallel)
    name = (
        choice.get("function", {}).get("name")
        if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
        else None
    )
    if not isinstance(name, str):
        raise InvalidRequestError(
            "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    if name not in params:
        raise InvalidRequestError(f"'tool_choice' names the function {name!r}, which is not in 'tools'", "tool_choice")
    i = list(params).index(name)
    return ToolUse("named", name, _forced(params[name], f"tools[{i}].function.parameters"))


def _forced(schema: dict, param: str) -> StructuredOutputsParams:
    # JSON as json.dumps writes it (", " and ": ", no other whitespace): arguments are for programs, and a
    # model cannot wander into whitespace.
    return StructuredOutputsParams(json=schema, disable_any_whitespace=True, param=param)
