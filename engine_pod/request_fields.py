"""Which request fields the server reads: every field of a body is honoured, or accepted only at the value
that changes nothing, or refused with a 400 naming it. Nothing is silently ignored.

The names are OpenAI's and vLLM's (vLLM's protocol defines the extra sampling fields); a field nobody
defines is refused too, as a typo (`max_token`) would otherwise pass unnoticed.
"""

from nanoserve.engine_pod.errors import InvalidRequestError

# Read by the server (openai_protocol.py, structured_params.py, tool_choice.py, common/chat.py).
HONOURED = {
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "seed",
    "priority",
    "cache_salt",
    "response_format",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "n",
    "best_of",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "min_tokens",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "prompt_logprobs",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "truncate_prompt_tokens",
    "return_tokens_as_token_ids",
}
CHAT = {
    "messages",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "chat_template_kwargs",
    "top_logprobs",
    "add_generation_prompt",
    "continue_final_message",
}
COMPLETION = {"prompt", "echo"}
INFORMATIONAL = {"user", "metadata", "request_id"}  # they never change an answer
# Not implemented (yet): accepted at the value that changes nothing, else a 400. (None is always accepted.)
AT_NO_OP = {
    "suffix": ("",),
    "length_penalty": (1,),
    "echo": (False,),
    "use_beam_search": (False,),
    "spaces_between_special_tokens": (True,),
    "logits_processors": (),
    "chat_template": (),
    "documents": (),
    "mm_processor_kwargs": (),
    "store": (False,),
    "service_tier": ("auto", "default"),
    "functions": (),
    "function_call": (),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "vllm_xargs": (),
    "kv_transfer_params": (),
    "include_reasoning": (True,),
    "structural_tag": (),
    "guided_decoding_backend": ("xgrammar",),
    "guided_whitespace_pattern": (),
    "return_token_ids": (False,),
    "media_io_kwargs": (),
    "prompt_embeds": (),
}
# vLLM's default for add_special_tokens differs by endpoint: the chat template writes them itself.
_ADD_SPECIAL_TOKENS = {True: (False,), False: (True,)}


def check_fields(body: dict, chat: bool) -> None:
    """Raise InvalidRequestError naming the first field this server would not honour."""
    own, other = (CHAT, COMPLETION) if chat else (COMPLETION, CHAT)
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    for name, value in body.items():
        if name in HONOURED or name in own or name in INFORMATIONAL or value is None:
            continue
        if name in other and name not in AT_NO_OP:
            raise InvalidRequestError(f"'{name}' is not a field of {endpoint}", name)
        allowed = _ADD_SPECIAL_TOKENS[chat] if name == "add_special_tokens" else AT_NO_OP.get(name)
        if allowed is None:
            raise InvalidRequestError(f"unrecognized request field '{name}'", name)
        if not any(value == a and type(value) is not bool or value is a for a in allowed):
            raise InvalidRequestError(f"'{name}' is not supported by this server (only at its default)", name)
