"""Every request field is honoured, accepted only at its no-op value, or refused naming it (request_fields.py):
each field of vLLM's chat and completion protocols is known, and nothing else passes."""

import pytest

from nanoserve.engine_pod.errors import InvalidRequestError
from nanoserve.engine_pod.request_fields import AT_NO_OP, CHAT, COMPLETION, HONOURED, INFORMATIONAL, check_fields

# The fields of vLLM's ChatCompletionRequest and CompletionRequest (OpenAI's, and vLLM's extra sampling ones).
VLLM_COMMON = """model frequency_penalty logit_bias logprobs max_tokens n presence_penalty response_format seed stop
stream stream_options temperature top_p user best_of use_beam_search top_k min_p repetition_penalty length_penalty
stop_token_ids include_stop_str_in_output ignore_eos min_tokens skip_special_tokens spaces_between_special_tokens
truncate_prompt_tokens prompt_logprobs allowed_token_ids add_special_tokens structured_outputs guided_json
guided_regex guided_choice guided_grammar structural_tag guided_decoding_backend guided_whitespace_pattern priority
request_id logits_processors return_tokens_as_token_ids return_token_ids cache_salt kv_transfer_params
vllm_xargs""".split()
VLLM_CHAT = """messages top_logprobs max_completion_tokens tools tool_choice reasoning_effort include_reasoning
parallel_tool_calls bad_words echo add_generation_prompt continue_final_message documents chat_template
chat_template_kwargs mm_processor_kwargs""".split()
VLLM_COMPLETION = "prompt echo suffix prompt_embeds".split()
NOT_DEFAULT = {
    "echo": True,
    "spaces_between_special_tokens": False,
    "use_beam_search": True,
    "store": True,
    "service_tier": "flex",
    "add_special_tokens": True,
    "length_penalty": 2.0,
}


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_every_vllm_field_is_known(chat):
    known = HONOURED | INFORMATIONAL | set(AT_NO_OP) | {"add_special_tokens"} | (CHAT if chat else COMPLETION)
    assert not set(VLLM_COMMON + (VLLM_CHAT if chat else VLLM_COMPLETION)) - known


@pytest.mark.parametrize("name, value", NOT_DEFAULT.items())
def test_unimplemented_fields_pass_only_at_their_no_op_value(name, value):
    with pytest.raises(InvalidRequestError) as e:
        check_fields({name: value}, chat=True)
    assert e.value.param == name
    no_op = (False,) if name == "add_special_tokens" else AT_NO_OP[name]  # (chat: the template adds them)
    for ok in no_op + (None,):
        check_fields({name: ok}, chat=True)
    check_fields({"add_special_tokens": True}, chat=False)


def test_unknown_and_wrong_endpoint_fields_are_refused():
    for body, chat, param in (
        ({"max_token": 5}, True, "max_token"),
        ({"messages": []}, False, "messages"),
        ({"prompt": "x"}, True, "prompt"),
        ({"tools": []}, False, "tools"),
        ({"suffix": True}, False, "suffix"),
    ):
        with pytest.raises(InvalidRequestError) as e:
            check_fields(body, chat)
        assert e.value.param == param
    check_fields({"user": "u1", "metadata": {"a": "b"}, "n": 1, "logprobs": False, "presence_penalty": 0.0}, True)
