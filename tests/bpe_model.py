"""A tiny random model whose tokenizer is byte-level BPE (GPT-2 style) over printable ASCII, so that a
grammar mask can make random weights spell JSON, regexes and choices. Every token id is a real token
(no padding ids) and every token is ASCII: a grammar that allows any text allows every token."""

import json
import string

CORPUS = [
    '{"name": "Ada", "age": 36, "color": "red", "tags": ["x", "y"]}',
    "[1, 2.5, -3e2, true, false, null]",
    "hello world, this is a test of 123 and abc-xyz",
    "yes no maybe never",
    string.printable,
] * 20
EOS = "<|endoftext|>"


# A ChatML template in the manner of Qwen3's (written for these tests): tools in the system turn, Hermes
# <tool_call> blocks for an assistant's calls, tool results in <tool_response>, earlier reasoning in <think>,
# and `enable_thinking: false` writing an empty think block into the prompt.
CHAT_TEMPLATE = """\
{%- set first_system = messages[0].role == 'system' -%}
{%- if tools -%}
<|im_start|>system
{% if first_system %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call a function with <tool_call>
{"name": <name>, "arguments": <arguments>}
</tool_call><|im_end|>
{% elif first_system -%}
<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif -%}
{%- for m in messages -%}
{%- if m.role == 'system' and loop.first -%}
{%- elif m.role == 'tool' -%}
<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% elif m.role == 'assistant' -%}
<|im_start|>assistant
{% if m.reasoning_content %}<think>
{{ m.reasoning_content }}
</think>

{% endif %}{{ m.content }}{% for c in m.tool_calls or [] %}
<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{%- endif -%}
"""


def save_bpe_model(folder: str, seed: int = 0) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nanoserve.engine_pod.random_model import save_random_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No initial alphabet: only the corpus's characters (printable ASCII) become tokens.
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    config = dict(
        model_type="qwen3",
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        initializer_range=0.25,
        tie_word_embeddings=False,
        eos_token_id=fast.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    save_random_model(folder, config, seed=seed)
    fast.save_pretrained(folder)  # replaces the word-level tokenizer save_random_model wrote
    with open(f"{folder}/config.json") as f:
        assert json.load(f)["vocab_size"] == len(fast)
    return folder


# The schema the structured-output tests constrain this model to.
# Bounded strings by pattern: xgrammar 0.2.9's maxLength rule lets raw control characters into strings.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
# Free whitespace runs are capped (structured_output.MAX_WHITESPACE = 20): 12 runs and at most ~45 other
# characters, so 300 tokens always complete it, even for a random model stuck on newlines.
