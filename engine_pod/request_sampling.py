"""An OpenAI request body's sampling fields -> SamplingParams, each field checked (APIError naming it)."""

from typing import Any

from nanoserve.common.block_hash import tenant_salt
from nanoserve.engine_pod.api_error import APIError
from nanoserve.engine_pod.errors import InvalidRequestError
from nanoserve.engine_pod.sampling_params import SamplingParams
from nanoserve.engine_pod.structured_params import StructuredOutputsParams, request_constraint


def get_field(body: dict, name: str, types: tuple, default: Any = None) -> Any:
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
        return float(get_field(body, name, (int, float), default))
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


def sampling_params(
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
    max_tokens = get_field(body, "max_completion_tokens", (int,))
    if max_tokens is None:  # (not `or`: 0 is refused by SamplingParams, not taken for "no limit")
        max_tokens = get_field(body, "max_tokens", (int,))
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
    stop = get_field(body, "stop", (str, list))
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop")
    stop_ids = get_field(body, "stop_token_ids", (list,), [])
    if not all(isinstance(t, int) for t in stop_ids):
        raise APIError(400, "'stop_token_ids' must be a list of integers", "stop_token_ids")
    try:
        return SamplingParams(
            temperature=_float(body, "temperature", d.get("temperature", 1.0)),
            top_p=_float(body, "top_p", d.get("top_p", 1.0)),
            top_k=get_field(body, "top_k", (int,), d.get("top_k", -1)),
            max_tokens=max_tokens,
            ignore_eos=get_field(body, "ignore_eos", (bool,), False),
            stop=stop,
            stop_token_ids=stop_ids,
            seed=get_field(body, "seed", (int,)),
            priority=get_field(body, "priority", (int,), 0),
            cache_salt=_cache_salt(body, salt_key),
            structured_outputs=_constraint(body, forced),
            n=get_field(body, "n", (int,), 1),
            best_of=get_field(body, "best_of", (int,)),
            presence_penalty=_float(body, "presence_penalty", 0.0),
            frequency_penalty=_float(body, "frequency_penalty", 0.0),
            repetition_penalty=_float(body, "repetition_penalty", d.get("repetition_penalty", 1.0)),
            min_p=_float(body, "min_p", d.get("min_p", 0.0)),
            min_tokens=get_field(body, "min_tokens", (int,), 0),
            logit_bias=get_field(body, "logit_bias", (dict,)),
            allowed_token_ids=get_field(body, "allowed_token_ids", (list,)),
            bad_words=get_field(body, "bad_words", (list,)),
            logprobs=_logprobs(body, chat),
            prompt_logprobs=_prompt_logprobs(body, chat),
            skip_special_tokens=get_field(body, "skip_special_tokens", (bool,), True),
            include_stop_str_in_output=get_field(body, "include_stop_str_in_output", (bool,), False),
        )
    except InvalidRequestError as e:
        raise APIError.invalid(e) from None


def _prompt_logprobs(body: dict, chat: bool) -> int | None:
    """vLLM's prompt_logprobs; a completion that echoes its prompt with logprobs scores the prompt too."""
    asked = get_field(body, "prompt_logprobs", (int,))
    if asked is not None and get_field(body, "stream", (bool,), False):
        raise APIError(400, "'prompt_logprobs' is not available with 'stream'", "prompt_logprobs")
    if not chat and get_field(body, "echo", (bool,), False) and body.get("logprobs") is not None:
        asked = max(asked or 0, _logprobs(body, chat) or 0)
    return asked


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many top logprobs a token gets (0: the sampled token's alone), None for no logprobs. Chat asks with
    `logprobs: true` and `top_logprobs`; completions with `logprobs: <int>`."""
    if not chat:
        return get_field(body, "logprobs", (int,))
    top = get_field(body, "top_logprobs", (int,))
    if not get_field(body, "logprobs", (bool,), False):
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
