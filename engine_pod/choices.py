"""A response's choices. Each choice is one engine request: `n` of them per prompt (`best_of` generated, the
best `n` kept), one prompt or a completions batch of several. A choice turns its request's token deltas
into text (TextStream), a chat message's parts (ChatOutput) and OpenAI's logprobs objects.

The n requests of a prompt go to the engine together, so the first one's prompt blocks are in the prefix
cache when the others are admitted (in the same step even: blocks are hashed when allocated, and a step
stores every token's KV before any attention reads it): the prompt is computed once, as in vLLM's fan-out.
"""

from nanoserve.engine_pod.chat_output import ChatOutput
from nanoserve.engine_pod.engine_request import TokenDelta
from nanoserve.engine_pod.openai_protocol import ParsedRequest
from nanoserve.engine_pod.sampling_params import SamplingParams
from nanoserve.engine_pod.text_stream import TextStream
from nanoserve.engine_pod.token_logprobs import TokenLogprobs

_UNSCORED = TokenLogprobs(0.0, 0, [])  # the prompt's first token: nothing before it to score it


class LogprobsWriter:
    """OpenAI's logprobs objects for a choice's tokens: chat's `{"content": [...]}`, or the completions API's
    parallel lists. A token's text is its own decode, as in vLLM (a piece of a UTF-8 character reads U+FFFD)."""

    def __init__(self, tokenizer, chat: bool, tokens_as_ids: bool = False) -> None:
        self.tokenizer, self.chat, self.tokens_as_ids = tokenizer, chat, tokens_as_ids
        self.offset = 0  # completions: where the next token's text starts in the choice's text

    def _text(self, token: int) -> str:
        return f"token_id:{token}" if self.tokens_as_ids else self.tokenizer.decode([token])

    def part(self, token_ids: list[int], entries: list) -> dict:
        if self.chat:
            return {"content": [self._chat_entry(t, e) for t, e in zip(token_ids, entries)]}
        tokens, offsets = [], []
        for t in token_ids:
            tokens.append(self._text(t))
            offsets.append(self.offset)
            self.offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self._text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def _chat_entry(self, token: int, entry) -> dict:
        top = [self._named(t, lp) for t, lp in entry.top]
        return self._named(token, entry.logprob) | {"top_logprobs": top}

    def _named(self, token: int, logprob: float) -> dict:
        text = self._text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def prompt_logprobs_json(tokenizer, prompt_ids: list[int], entries: list) -> list:
    """vLLM's `prompt_logprobs`: None for the first token, then per prompt token {token id: {logprob, rank,
    decoded_token}} for the token itself and the top ones."""
    out: list = [None]
    for token, e in zip(prompt_ids[1:], entries):
        scored = {
            str(t): {"logprob": lp, "rank": r, "decoded_token": tokenizer.decode([t])}
            for r, (t, lp) in enumerate(e.top, 1)
        }
        scored[str(token)] = {"logprob": e.logprob, "rank": e.rank, "decoded_token": tokenizer.decode([token])}
        out.append(scored)
    return out


def merge_logprobs(parts: list[dict], chat: bool) -> dict | None:
    if not parts:
        return None
    if chat:
        return {"content": [e for p in parts for e in p["content"]]}
    return {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


class Choice:
    """One choice as its tokens come."""

    def __init__(
        self,
        index: int,
        prompt: int,
        tokenizer,
        req: ParsedRequest,
        params: SamplingParams,
        chat: bool,
        prefix: str = "",
    ) -> None:
        self.index, self.prompt, self.chat = index, prompt, chat  # prompt: its index in a completions batch
        self.text = TextStream(tokenizer, params.stop, params.skip_special_tokens, params.include_stop_str_in_output)
        self.output = ChatOutput(req.tool_use, req.reasoning, req.thinking_in_prompt) if chat else None
        self.logprobs = LogprobsWriter(tokenizer, chat, req.tokens_as_ids) if req.params.logprobs is not None else None
        self.prefix = prefix  # echo: the prompt's text, sent before the first token's
        self.echo_logprobs = req.echo and self.logprobs is not None  # and the prompt's logprobs
        self.prompt_ids = req.prompts[prompt][0]
        self.prompt_logprobs: list | None = None  # prompt_logprobs_json's, once the first token came
        self.finish: str | None = None
        self.count = self.cached = 0
        self.sum_logprob = 0.0
        self.pieces: list[str] = []
        self.logprob_parts: list[dict] = []

    def push(self, delta: TokenDelta) -> tuple[str, dict | None]:
        """The text and the logprobs object for the delta's tokens."""
        self.finish, self.cached = delta.finish_reason, delta.num_cached_tokens
        self.count += len(delta.token_ids)
        if delta.logprobs:
            self.sum_logprob += sum(e.logprob for e in delta.logprobs)
        piece = self.prefix + self.text.push(delta.token_ids, delta.finish_reason is not None)
        self.prefix = ""
        part = None
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = prompt_logprobs_json(self.text.tokenizer, self.prompt_ids, delta.prompt_logprobs)
            if self.echo_logprobs and self.logprobs:  # the prompt's tokens open the logprobs, the first scored None
                first = self.logprobs.part(self.prompt_ids, [_UNSCORED] + delta.prompt_logprobs)
                first["token_logprobs"][0] = first["top_logprobs"][0] = None
                part = first
        if self.logprobs is not None:
            tokens = self.logprobs.part(delta.token_ids, delta.logprobs or [])
            part = tokens if part is None else merge_logprobs([part, tokens], self.chat)
        return piece, part

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / max(1, self.count)

    def absorb(self, delta: TokenDelta) -> None:
        """Non-streaming: take the delta into the final choice."""
        piece, part = self.push(delta)
        self.pieces.append(piece)
        if part is not None:
            self.logprob_parts.append(part)

    def final(self) -> dict:
        """The choice of a non-streamed response."""
        logprobs = merge_logprobs(self.logprob_parts, self.chat) if self.logprobs is not None else None
        content = "".join(self.pieces)
        if self.output is None:  # a completion
            extra = {} if self.prompt_logprobs is None else {"prompt_logprobs": self.prompt_logprobs}
            return {"index": self.index, "text": content, "logprobs": logprobs, "finish_reason": self.finish} | extra
        self.output.push(content, True)
        return {
            "index": self.index,
            "message": self.output.message(),
            "logprobs": logprobs,
            "finish_reason": self.output.finish_reason(self.finish),
        }

    def chunk(self, piece: str, part: dict | None) -> dict | None:
        """A streamed chunk's choice for the delta just pushed, or None when it carries nothing."""
        done = self.finish is not None
        if self.output is None:  # a completion
            if not piece and not done and not part:
                return None
            return {"index": self.index, "text": piece, "logprobs": part, "finish_reason": self.finish}
        if self.output.plain:
            delta = {"content": piece} if piece or not done else {}
        else:
            delta = self.output.push(piece, done).to_openai()
        if not delta and not done and not part:
            return None
        return {
            "index": self.index,
            "delta": delta,
            "logprobs": part,
            "finish_reason": self.output.finish_reason(self.finish),
        }
