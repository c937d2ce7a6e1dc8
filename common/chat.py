"""Chat messages as the chat template sees them. The engine server and the gateway both call this, so a
chat request tokenizes to the same ids in both (the gateway's prefix hashes must match the engine's)."""
from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "developer", "tool")


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
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out
