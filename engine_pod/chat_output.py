"""A chat response's text read back into OpenAI's parts: `reasoning` (the text a thinking model writes in
<think>...</think>), `content`, and `tool_calls`. The same reader serves streaming (a delta per step) and
non-streaming (the deltas merged), so both give the same message."""

from dataclasses import dataclass, field

from nanoserve.engine_pod.reasoning import ReasoningParser
from nanoserve.engine_pod.tool_choice import ToolUse
from nanoserve.engine_pod.tool_parsers import ToolCallDelta, make_tool_parser, merge_tool_calls


@dataclass
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def to_openai(self) -> dict:
        """A streaming chunk's `delta`. Reasoning goes out as vLLM's `reasoning` and as `reasoning_content`,
        the name DeepSeek's API and many clients (e.g. the Vercel AI SDK) read."""
        delta: dict = {"reasoning": self.reasoning, "reasoning_content": self.reasoning} if self.reasoning else {}
        if self.content:
            delta["content"] = self.content
        if self.tool_calls:
            delta["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return delta


class ChatOutput:
    """One response's reader: text in (as it streams), ChatDelta out."""

    def __init__(
        self, tool_use: ToolUse | None = None, reasoning: str | None = None, thinking_in_prompt: bool = False
    ) -> None:
        use = tool_use or ToolUse(None)
        self.tools = make_tool_parser(use.parser, function=use.function) if use.parser else None
        self.parallel, self.forced = use.parallel, use.parser == "named"
        self.reasoning = ReasoningParser(reasoning, thinking_in_prompt) if reasoning else None
        self.has_reasoning = reasoning is not None
        self.calls: list[ToolCallDelta] = []
        self.text: list[str] = []
        self.thought: list[str] = []

    @property
    def plain(self) -> bool:
        """Only content comes out: the server's fast path for streaming chunks applies."""
        return self.tools is None and self.reasoning is None

    def push(self, text: str, finished: bool) -> ChatDelta:
        thought, content = self.reasoning.push(text, finished) if self.reasoning else ("", text)
        calls: list[ToolCallDelta] = []
        if self.tools is not None:
            parsed = self.tools.push(content, finished)
            content = parsed.content
            # parallel_tool_calls false: the first call only (what the model writes after it is dropped)
            calls = [c for c in parsed.tool_calls if self.parallel or c.index == 0]
        self.calls += calls
        self.text.append(content)
        self.thought.append(thought)
        return ChatDelta(thought, content, calls)

    def finish_reason(self, finish: str | None) -> str | None:
        # OpenAI's: "tool_calls" when the model chose to call; a forced named function ends with "stop".
        return "tool_calls" if self.calls and finish == "stop" and not self.forced else finish

    def message(self) -> dict:
        """The non-streaming `message`, from everything pushed."""
        content = "".join(self.text)
        msg = {"role": "assistant", "content": content or (None if self.calls else "")}
        if self.has_reasoning:
            thought = "".join(self.thought) or None
            msg["reasoning"] = msg["reasoning_content"] = thought
        if self.calls:
            msg["tool_calls"] = merge_tool_calls(self.calls)
        return msg
