"""vLLM's utility endpoints beside the OpenAI API: POST /tokenize (a completion prompt, or chat messages
rendered exactly as /v1/chat/completions renders them), POST /detokenize, GET /version (and /ping, routed to /health
in server.py)."""

from aiohttp import web

from nanoserve.common.chat import ChatFieldError, ChatTemplateError, chat_prompt_ids, completion_prompt_ids
from nanoserve.common.version import package_version
from nanoserve.engine_pod.api_error import APIError
from nanoserve.engine_pod.server_state import STATE, engine_for, json_body

_COMPLETION = {"model", "prompt", "add_special_tokens", "return_token_strs"}
_CHAT = {"model", "messages", "tools", "chat_template_kwargs", "add_generation_prompt", "return_token_strs"}


def _fields(body: dict, allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise APIError(400, f"unrecognized field '{name}' for /tokenize", name)
    if body.get("add_generation_prompt", True) is not True:  # the chat API always adds it
        raise APIError(400, "'add_generation_prompt' can only be true", "add_generation_prompt")


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await json_body(request)
    engine = engine_for(state, body)
    tok = state.tokenizer
    try:
        if "messages" in body:
            _fields(body, _CHAT)
            ids = chat_prompt_ids(tok, body["messages"], body.get("tools"), body.get("chat_template_kwargs"))
        else:
            _fields(body, _COMPLETION)
            if "prompt" not in body:
                raise APIError(400, "'prompt' or 'messages' is required", "prompt")
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise APIError(400, "'add_special_tokens' must be a boolean", "add_special_tokens")
            ids = (
                completion_prompt_ids(tok, body["prompt"])
                if special or not isinstance(body["prompt"], str)
                else tok.encode(body["prompt"], add_special_tokens=False)
            )
    except ChatTemplateError as e:
        raise APIError(400, f"the messages do not fit the model's chat template: {e}", "messages") from None
    except ChatFieldError as e:
        raise APIError(400, str(e), e.param) from None
    strs = tok.convert_ids_to_tokens(ids) if body.get("return_token_strs") else None
    return web.json_response(
        {"count": len(ids), "max_model_len": engine.config.max_model_len, "tokens": ids, "token_strs": strs}
    )


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await json_body(request)
    engine = engine_for(state, body)
    ids, vocab = body.get("tokens"), engine.config.hf_config["vocab_size"]
    extra = set(body) - {"model", "tokens"}
    if extra:
        raise APIError(400, f"unrecognized field '{min(extra)}' for /detokenize", min(extra))
    if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):
        raise APIError(400, f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
    return web.json_response({"prompt": state.tokenizer.decode(ids)})


async def server_version(request: web.Request) -> web.Response:
    return web.json_response({"version": package_version()})
