"""A tiny random model whose tokenizer is byte-level BPE (GPT-2 style) over printable ASCII, so that a
grammar mask can make random weights spell JSON, regexes and choices. Every token id is a real token
(no padding ids) and every token is ASCII: a grammar that allows any text allows every token."""
import json
import string

CORPUS = ['{"name": "Ada", "age": 36, "color": "red", "tags": ["x", "y"]}', '[1, 2.5, -3e2, true, false, null]',
          "hello world, this is a test of 123 and abc-xyz", "yes no maybe never", string.printable] * 20
EOS = "<|endoftext|>"


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
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    config = dict(model_type="qwen3", vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=1024, initializer_range=0.25, tie_word_embeddings=False,
                  eos_token_id=fast.eos_token_id, bos_token_id=None, pad_token_id=None)
    save_random_model(folder, config, seed=seed)
    fast.save_pretrained(folder)  # replaces the word-level tokenizer save_random_model wrote
    with open(f"{folder}/config.json") as f:
        assert json.load(f)["vocab_size"] == len(fast)
    return folder


# The schema the structured-output tests constrain this model to.
# Bounded strings by pattern: xgrammar 0.2.9's maxLength rule lets raw control characters into strings.
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "color": {"enum": ["red", "green", "blue"]}},
          "required": ["name", "age", "color"], "additionalProperties": False}
# Free whitespace runs are capped (structured_output.MAX_WHITESPACE = 20): 12 runs and at most ~45 other
# characters, so 300 tokens always complete it, even for a random model stuck on newlines.
