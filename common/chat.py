"""Chat messages as the chat template sees them, and the prompt ids of chat and completion requests.

The engine server and the gateway both call these, so a request tokenizes to the same ids in both (the
gateway's prefix hashes must match the engine's).
"""
from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "developer", "tool")


class ChatTemplateError(ValueError):
    """The model's chat template refused the messages (e.g. roles that must alternate)."""


def template_messages(messages: Any) -> list[dict]:
    """OpenAI messages -> [{"role", "content"}]: text parts joined, "developer" as "system", other fields
    dropped. Raises ValueError (with a client-facing message) for anything else."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] must be an object with a role of system, user, assistant, "
                             "developer or tool")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        check_text(content, f"messages[{i}].content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def check_text(text: str, where: str) -> None:
    """JSON escapes can carry lone surrogates (\\ud800), which are not text: no tokenizer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} is not valid Unicode text: {e.reason} at position {e.start}") from None


def chat_prompt_ids(tokenizer: Any, messages: Any) -> list[int]:
    """Token ids of a chat request's prompt: the chat template with the generation prompt, then encoded
    without adding special tokens again (the template wrote them)."""
    rendered = template_messages(messages)
    try:
        text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - jinja raises anything, including the template's own errors
        raise ChatTemplateError(str(e)) from None
    return tokenizer.encode(text, add_special_tokens=False)


def completion_prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of one completion prompt: a string is encoded (special tokens added), ids pass as given."""
    if isinstance(prompt, str):
        check_text(prompt, "'prompt'")
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ValueError("'prompt' must be a string or a list of token ids")
