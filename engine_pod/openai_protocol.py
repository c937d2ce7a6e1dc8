"""OpenAI request parsing and validation: JSON body -> (prompt token ids, SamplingParams, options).

Everything a client can get wrong becomes an `APIError` with an OpenAI-shaped body and a 4xx status;
the server never answers a bad request with a 500. `salt_key`: the API key a request authenticated with,
when the server salts the prefix cache by key (--cache-salt-by-api-key): tenants then share no cached block.
"""

from dataclasses import dataclass, field

from nanoserve.common.chat import (
    ChatFieldError,
    ChatTemplateError,
    chat_prompt,
    completion_prompt_ids,
    template_options,
)
from nanoserve.engine_pod.admission import check_prompt
from nanoserve.engine_pod.api_error import APIError
from nanoserve.engine_pod.errors import InvalidRequestError
from nanoserve.engine_pod.reasoning import prompt_opens_thinking
from nanoserve.engine_pod.request_fields import check_fields
from nanoserve.engine_pod.request_sampling import get_field, sampling_params
from nanoserve.engine_pod.sampling_params import SamplingParams
from nanoserve.engine_pod.tool_choice import ChatConfig, ToolUse, tool_use


@dataclass
class ParsedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    tool_use: ToolUse | None = None  # chat: how to read tool calls out of the output
    reasoning: str | None = None  # chat: the reasoning parser's kind, None for no reasoning apart
    thinking_in_prompt: bool = False  # chat: the template ended the prompt inside an open <think>
    more_prompts: list[tuple[list[int], SamplingParams]] = field(default_factory=list)  # a completions batch
    echo: bool = False  # completions: the prompt's text starts each choice's text
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:<id>" (vLLM's return_tokens_as_token_ids)

    @property
    def prompts(self) -> list[tuple[list[int], SamplingParams]]:
        return [(self.prompt_ids, self.params)] + self.more_prompts


def _check_fields(body: dict, chat: bool) -> None:
    try:
        check_fields(body, chat)
    except InvalidRequestError as e:
        raise APIError.invalid(e) from None


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = get_field(body, "stream", (bool,), False)
    options = get_field(body, "stream_options", (dict,), {})
    if options and not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    return stream, bool(options.get("include_usage", False))


def _truncated(body: dict, ids: list[int], max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the prompt's last k tokens (-1: as many as the model takes)."""
    k = get_field(body, "truncate_prompt_tokens", (int,))
    if k is None:
        return ids
    if k < -1 or k == 0:
        raise APIError(400, "'truncate_prompt_tokens' must be -1 or an integer >= 1", "truncate_prompt_tokens")
    k = max_model_len - 1 if k == -1 else k
    if k >= max_model_len:
        raise APIError(
            400,
            f"'truncate_prompt_tokens' ({k}) must be below max_model_len ({max_model_len})",
            "truncate_prompt_tokens",
        )
    return ids[-k:]


def _check_prompt(ids: list[int], vocab_size: int, max_model_len: int) -> None:
    try:
        check_prompt(ids, vocab_size, max_model_len)  # the engine's own check, answered before any other
    except InvalidRequestError as e:
        raise APIError.invalid(e) from None


def parse_completion(
    body: dict,
    tokenizer,
    vocab_size: int,
    max_model_len: int,
    salt_key: str | None = None,
    defaults: dict | None = None,
) -> ParsedRequest:
    _check_fields(body, chat=False)
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", "prompt")
    batch = (
        prompt if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt) else [prompt]
    )  # a list of strings or of id lists is a batch: a choice (or n) per prompt, in order
    if len(batch) > MAX_BATCH_PROMPTS:
        raise APIError(400, f"a batch takes at most {MAX_BATCH_PROMPTS} prompts, got {len(batch)}", "prompt")
    prompts = []
    for one in batch:
        try:
            ids = completion_prompt_ids(tokenizer, one)
        except ChatFieldError as e:
            raise APIError(400, str(e), "prompt") from None
        ids = _truncated(body, ids, max_model_len)
        _check_prompt(ids, vocab_size, max_model_len)
        prompts.append((ids, sampling_params(body, len(ids), max_model_len, salt_key, chat=False, defaults=defaults)))
    stream, include_usage = _stream_options(body)
    (ids, params), *more = prompts
    _check_choices(params, stream)
    echo = get_field(body, "echo", (bool,), False)
    if echo and params.logprobs is not None and stream:
        raise APIError(400, "'echo' with 'logprobs' (the prompt's logprobs) is not available with 'stream'", "echo")
    return ParsedRequest(
        ids,
        params,
        stream,
        include_usage,
        more_prompts=more,
        echo=echo,
        tokens_as_ids=get_field(body, "return_tokens_as_token_ids", (bool,), False),
    )


MAX_BATCH_PROMPTS = 256  # a completions batch: a bounded amount of work per request


def _check_choices(params: SamplingParams, stream: bool) -> None:
    if params.ranks_best_of and stream:
        raise APIError(400, "'best_of' cannot be used with 'stream' (the best are known only at the end)", "best_of")


def parse_chat(
    body: dict,
    tokenizer,
    vocab_size: int,
    max_model_len: int,
    salt_key: str | None = None,
    chat: ChatConfig | None = None,
    defaults: dict | None = None,
) -> ParsedRequest:
    """`chat`: the server's tool-call and reasoning parsers (none by default)."""
    chat = chat or ChatConfig()
    _check_fields(body, chat=True)
    try:
        tools = tool_use(body, chat)
        text = chat_prompt(
            tokenizer, body.get("messages"), body.get("tools"), body.get("chat_template_kwargs"), template_options(body)
        )
    except ChatTemplateError as e:
        raise APIError(400, f"the messages do not fit the model's chat template: {e}", "messages") from None
    except (ChatFieldError, InvalidRequestError) as e:
        raise APIError(400, str(e), e.param) from None
    ids = _truncated(body, tokenizer.encode(text, add_special_tokens=False), max_model_len)
    _check_prompt(ids, vocab_size, max_model_len)
    stream, include_usage = _stream_options(body)
    params = sampling_params(body, len(ids), max_model_len, salt_key, tools.constraint, defaults=defaults)
    _check_choices(params, stream)
    reasoning, thinking = chat.reasoning_parser, False
    if reasoning is not None and params.structured_outputs is None:
        thinking = prompt_opens_thinking(text, reasoning)
    elif reasoning is not None:  # the grammar holds from the first token: reasoning only in a <think> it writes
        reasoning = "qwen3"
    return ParsedRequest(
        ids,
        params,
        stream,
        include_usage,
        tools,
        reasoning,
        thinking,
        tokens_as_ids=get_field(body, "return_tokens_as_token_ids", (bool,), False),
    )
