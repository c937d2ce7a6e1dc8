"""OpenAI request parsing and validation: JSON body -> (prompt token ids, SamplingParams, options).

Everything a client can get wrong becomes an `APIError` with an OpenAI-shaped body and a 4xx status;
the server never answers a bad request with a 500. `salt_key`: the API key a request authenticated with,
when the server salts the prefix cache by key (--cache-salt-by-api-key): tenants then share no cached block.
"""

from dataclasses import dataclass, field
from typing import Any

from nanoserve.common.api_errors import error_body
from nanoserve.common.block_hash import tenant_salt
from nanoserve.common.chat import (
    ChatFieldError,
    ChatTemplateError,
    chat_prompt,
    completion_prompt_ids,
    template_options,
)
from nanoserve.engine_pod.admission import check_prompt
from nanoserve.engine_pod.errors import InvalidRequestError
from nanoserve.engine_pod.reasoning import prompt_opens_thinking
from nanoserve.engine_pod.request_fields import check_fields
from nanoserve.engine_pod.sampling_params import SamplingParams
from nanoserve.engine_pod.structured_params import StructuredOutputsParams, request_constraint
from nanoserve.engine_pod.tool_choice import ChatConfig, ToolUse, tool_use


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    @classmethod
    def invalid(cls, e: InvalidRequestError) -> "APIError":
        """The 400 of a request the engine's checks refused."""
        return cls(400, str(e), e.param, e.code)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


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


def _get(body: dict, name: str, types: tuple, default: Any = None) -> Any:
    """body[name], checked to be one of `types` (a bool is no int here), or `default` when absent or null."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = "/".join(t.__name__ for t in types)
        raise APIError(400, f"'{name}' must be of type {names}, got {type(value).__name__}", name)
    return value


def _float(body: dict, name: str, default: float) -> float:
    """A number as a float (its range, NaN and infinities are SamplingParams' to check)."""
    try:
        return float(_get(body, name, (int, float), default))
    except OverflowError:  # an integer too large for a float
        raise APIError(400, f"'{name}' is out of range", name) from None


def _cache_salt(body: dict, salt_key: str | None) -> str | None:
    """The request's `cache_salt` (vLLM's), under its tenant's when the server salts by API key."""
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise APIError(400, "'cache_salt' must be a non-empty string", "cache_salt")
    return tenant_salt(salt_key, salt) if salt_key is not None else salt


# Completions without max_tokens stop after 16 tokens, as in OpenAI's legacy API and vLLM; chat runs to the end.
COMPLETION_MAX_TOKENS = 16


def _sampling_params(
    body: dict,
    prompt_len: int,
    max_model_len: int,
    salt_key: str | None,
    forced: StructuredOutputsParams | None = None,
    chat: bool = True,
    defaults: dict | None = None,
) -> SamplingParams:
    """`forced`: the structured output tool_choice asks for (a named function's arguments, or "required").
    `defaults`: the model's sampling defaults (Config.sampling_defaults) for the fields the body leaves out."""
    d = defaults or {}
    max_tokens = _get(body, "max_completion_tokens", (int,))
    if max_tokens is None:  # (not `or`: 0 is refused by SamplingParams, not taken for "no limit")
        max_tokens = _get(body, "max_tokens", (int,))
    if max_tokens is None and "max_tokens" in d:
        max_tokens = min(d["max_tokens"], max_model_len - prompt_len)
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len if chat else min(COMPLETION_MAX_TOKENS, max_model_len - prompt_len)
    if prompt_len + max_tokens > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
            f"completion). Please reduce the length of the prompt or completion.",
            "max_tokens",
            "context_length_exceeded",
        )
    stop = _get(body, "stop", (str, list))
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop")
    stop_ids = _get(body, "stop_token_ids", (list,), [])
    if not all(isinstance(t, int) for t in stop_ids):
        raise APIError(400, "'stop_token_ids' must be a list of integers", "stop_token_ids")
    try:
        return SamplingParams(
            temperature=_float(body, "temperature", d.get("temperature", 1.0)),
            top_p=_float(body, "top_p", d.get("top_p", 1.0)),
            top_k=_get(body, "top_k", (int,), d.get("top_k", -1)),
            max_tokens=max_tokens,
            ignore_eos=_get(body, "ignore_eos", (bool,), False),
            stop=stop,
            stop_token_ids=stop_ids,
            seed=_get(body, "seed", (int,)),
            priority=_get(body, "priority", (int,), 0),
            cache_salt=_cache_salt(body, salt_key),
            structured_outputs=_constraint(body, forced),
            n=_get(body, "n", (int,), 1),
            best_of=_get(body, "best_of", (int,)),
            presence_penalty=_float(body, "presence_penalty", 0.0),
            frequency_penalty=_float(body, "frequency_penalty", 0.0),
            repetition_penalty=_float(body, "repetition_penalty", d.get("repetition_penalty", 1.0)),
            min_p=_float(body, "min_p", d.get("min_p", 0.0)),
            min_tokens=_get(body, "min_tokens", (int,), 0),
            logit_bias=_get(body, "logit_bias", (dict,)),
            allowed_token_ids=_get(body, "allowed_token_ids", (list,)),
            bad_words=_get(body, "bad_words", (list,)),
            logprobs=_logprobs(body, chat),
            prompt_logprobs=_prompt_logprobs(body, chat),
            skip_special_tokens=_get(body, "skip_special_tokens", (bool,), True),
            include_stop_str_in_output=_get(body, "include_stop_str_in_output", (bool,), False),
        )
    except InvalidRequestError as e:
        raise APIError.invalid(e) from None


def _prompt_logprobs(body: dict, chat: bool) -> int | None:
    """vLLM's prompt_logprobs; a completion that echoes its prompt with logprobs scores the prompt too."""
    asked = _get(body, "prompt_logprobs", (int,))
    if asked is not None and _get(body, "stream", (bool,), False):
        raise APIError(400, "'prompt_logprobs' is not available with 'stream'", "prompt_logprobs")
    if not chat and _get(body, "echo", (bool,), False) and body.get("logprobs") is not None:
        asked = max(asked or 0, _logprobs(body, chat) or 0)
    return asked


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many top logprobs a token gets (0: the sampled token's alone), None for no logprobs. Chat asks with
    `logprobs: true` and `top_logprobs`; completions with `logprobs: <int>`."""
    if not chat:
        return _get(body, "logprobs", (int,))
    top = _get(body, "top_logprobs", (int,))
    if not _get(body, "logprobs", (bool,), False):
        if top:
            raise APIError(400, "'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
        return None
    if top is not None and top < 0:
        raise APIError(400, "'top_logprobs' must be >= 0", "top_logprobs")
    return top or 0


def _constraint(body: dict, forced: StructuredOutputsParams | None) -> StructuredOutputsParams | None:
    asked = request_constraint(body)  # response_format, structured_outputs, guided_*
    if asked is not None and forced is not None:
        raise InvalidRequestError(
            f"'{asked.param}' cannot be combined with a 'tool_choice' that forces a tool call", asked.param
        )
    return asked or forced


def _check_fields(body: dict, chat: bool) -> None:
    try:
        check_fields(body, chat)
    except InvalidRequestError as e:
        raise APIError.invalid(e) from None


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    if options and not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    return stream, bool(options.get("include_usage", False))


def _truncated(body: dict, ids: list[int], max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the prompt's last k tokens (-1: as many as the model takes)."""
    k = _get(body, "truncate_prompt_tokens", (int,))
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
        prompts.append((ids, _sampling_params(body, len(ids), max_model_len, salt_key, chat=False, defaults=defaults)))
    stream, include_usage = _stream_options(body)
    (ids, params), *more = prompts
    _check_choices(params, stream)
    echo = _get(body, "echo", (bool,), False)
    if echo and params.logprobs is not None and stream:
        raise APIError(400, "'echo' with 'logprobs' (the prompt's logprobs) is not available with 'stream'", "echo")
    return ParsedRequest(
        ids,
        params,
        stream,
        include_usage,
        more_prompts=more,
        echo=echo,
        tokens_as_ids=_get(body, "return_tokens_as_token_ids", (bool,), False),
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
    params = _sampling_params(body, len(ids), max_model_len, salt_key, tools.constraint, defaults=defaults)
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
        tokens_as_ids=_get(body, "return_tokens_as_token_ids", (bool,), False),
    )
