"""Chat requests as the chat template sees them, and the prompt ids of chat and completion requests.

The engine server and the gateway both call these, so a request tokenizes to the same ids in both (the
gateway's prefix hashes must match the engine's). Tools and `chat_template_kwargs` (e.g. Qwen3's
`enable_thinking`) are part of the prompt: the model's own template renders them.
"""

from __future__ import annotations

import json
import re
from typing import Any

ROLES = ("system", "user", "assistant", "developer", "tool")
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")  # OpenAI's rule (and '.', which vLLM allows)
# apply_chat_template's own arguments: a request's chat_template_kwargs may not set them.
_RESERVED_KWARGS = {
    "conversation",
    "messages",
    "tools",
    "documents",
    "tokenize",
    "add_generation_prompt",
    "continue_final_message",
    "return_dict",
    "return_tensors",
    "chat_template",
    "tokenizer",
    "padding",
    "truncation",
    "max_length",
    "return_assistant_tokens_mask",
    "tokenizer_kwargs",
}


class ChatTemplateError(ValueError):
    """The model's chat template refused the messages (e.g. roles that must alternate)."""


class ChatFieldError(ValueError):
    """A chat request field that cannot be rendered; `param` names it (e.g. "messages[2].tool_calls")."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _text(content: Any, where: str, optional: bool = False) -> str:
    if content is None and optional:
        return ""
    if isinstance(content, list):  # content parts: only text is supported
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ChatFieldError(f"{where}: only text parts are supported", where)
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ChatFieldError(f"{where} must be a string or a list of text parts", where)
    check_text(content, where)
    return content


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's tool_calls as templates read them: arguments as an object (Hermes/Qwen and
    Llama templates write `arguments | tojson`), as vLLM passes them."""
    if not isinstance(calls, list):
        raise ChatFieldError(f"{where} must be a list", where)
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise ChatFieldError(
                f"{where}[{j}] must be {{'id', 'type': 'function', 'function': {{'name', "
                "'arguments': a JSON string}}}",
                f"{where}[{j}]",
            )
        check_text(fn["arguments"], f"{where}[{j}].function.arguments")
        try:
            arguments = json.loads(fn["arguments"])
        except ValueError:
            arguments = fn["arguments"]  # not JSON: the template gets the text as it came
        out.append(
            {
                "id": call.get("id") if isinstance(call.get("id"), str) else f"call_{j}",
                "type": "function",
                "function": {"name": fn["name"], "arguments": arguments},
            }
        )
    return out


def template_messages(messages: Any) -> list[dict]:
    """OpenAI messages -> what the chat template reads: text parts joined, "developer" as "system", an
    assistant's tool_calls and reasoning, a tool message's tool_call_id and name. Raises ChatFieldError."""
    if not isinstance(messages, list) or not messages:
        raise ChatFieldError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ChatFieldError(
                f"{where} must be an object with a role of system, user, assistant, developer or tool", where
            )
        role = m["role"]
        calls = m.get("tool_calls") if role == "assistant" else None
        # An assistant message that calls tools may have no content.
        msg = {
            "role": "system" if role == "developer" else role,
            "content": _text(m.get("content"), f"{where}.content", optional=role == "assistant"),
        }
        if calls:
            msg["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise ChatFieldError(f"{where}.tool_call_id must be a string", f"{where}.tool_call_id")
            msg["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        reasoning = m.get("reasoning", m.get("reasoning_content"))  # vLLM's name, and DeepSeek's
        if role == "assistant" and isinstance(reasoning, str):
            msg["reasoning_content"] = reasoning  # the name Qwen3's template reads
        out.append(msg)
    return out


def template_tools(tools: Any) -> list[dict] | None:
    """A request's `tools`, checked (OpenAI's function tools), as the template's `tools=` argument."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise ChatFieldError("'tools' must be a list", "tools")
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ChatFieldError(f"{where} must be {{'type': 'function', 'function': {{...}}}}", where)
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise ChatFieldError(
                f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.'", f"{where}.function.name"
            )
        if name in names:
            raise ChatFieldError(f"{where}.function.name: two tools are named {name!r}", f"{where}.function.name")
        names.add(name)
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ChatFieldError(
                f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters"
            )
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ChatFieldError(f"{where}.function.description must be a string", f"{where}.function.description")
    return tools


def template_kwargs(kwargs: Any) -> dict:
    """A request's `chat_template_kwargs` (vLLM's): extra variables for the template."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ChatFieldError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    reserved = sorted(set(kwargs) & _RESERVED_KWARGS)
    if reserved:
        raise ChatFieldError(f"'chat_template_kwargs' may not set {', '.join(reserved)}", "chat_template_kwargs")
    return kwargs


def check_text(text: str, where: str) -> None:
    """JSON escapes can carry lone surrogates (\\ud800), which are not text: no tokenizer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ChatFieldError(f"{where} is not valid Unicode text: {e.reason} at position {e.start}", where) from None


def template_options(body: dict) -> dict:
    """A chat body's `add_generation_prompt` (default true) and `continue_final_message` (vLLM's: the reply
    continues the last, assistant, message instead of starting a new one) as apply_chat_template takes them."""
    options = {
        "add_generation_prompt": body.get("add_generation_prompt", True),
        "continue_final_message": body.get("continue_final_message", False),
    }
    for name, value in options.items():
        if value is None:
            options[name] = name == "add_generation_prompt"
        elif not isinstance(value, bool):
            raise ChatFieldError(f"'{name}' must be a boolean", name)
    if options["add_generation_prompt"] and options["continue_final_message"]:
        raise ChatFieldError(
            "'continue_final_message' needs 'add_generation_prompt' set to false", "continue_final_message"
        )
    return options


def chat_prompt(
    tokenizer: Any, messages: Any, tools: Any = None, kwargs: Any = None, options: dict | None = None
) -> str:
    """A chat request's prompt text: the model's chat template over messages and tools, with the generation
    prompt unless `options` (template_options) say otherwise. Raises ChatFieldError (bad fields) or
    ChatTemplateError (the template refused)."""
    rendered, tools, kwargs = template_messages(messages), template_tools(tools), template_kwargs(kwargs)
    options = options or {"add_generation_prompt": True}
    if options.get("continue_final_message") and (not rendered or rendered[-1]["role"] != "assistant"):
        raise ChatFieldError("'continue_final_message' needs an assistant message last", "continue_final_message")
    try:
        return tokenizer.apply_chat_template(rendered, tools=tools, tokenize=False, **options, **kwargs)
    except Exception as e:  # noqa: BLE001 - jinja raises anything, including the template's own errors
        raise ChatTemplateError(str(e)) from None


def chat_prompt_ids(
    tokenizer: Any, messages: Any, tools: Any = None, kwargs: Any = None, options: dict | None = None
) -> list[int]:
    """Token ids of a chat request's prompt, encoded without adding special tokens again (the template
    wrote them)."""
    return tokenizer.encode(chat_prompt(tokenizer, messages, tools, kwargs, options), add_special_tokens=False)


def completion_prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of one completion prompt: a string is encoded (special tokens added), ids pass as given."""
    if isinstance(prompt, str):
        check_text(prompt, "'prompt'")
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ChatFieldError("'prompt' must be a string or a list of token ids", "prompt")
