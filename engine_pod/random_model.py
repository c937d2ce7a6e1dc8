"""Random-weight Hugging Face model folders, for tests and benchmarks on machines that reach no model hub.

`save_random_model(folder, config)` writes config.json, safetensors with seeded random weights, and a
word-level tokenizer over the words w0..w{V-1} (so text round-trips and chat templates render).
"""

import torch


def save_tokenizer(folder: str, vocab_size: int) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    # single_word: the special words w0-w2 must not match inside w10, w123, ... (added tokens match anywhere).
    special = {
        name: AddedToken(word, single_word=True, special=True)
        for name, word in (("unk_token", "w0"), ("eos_token", "w1"), ("bos_token", "w2"))
    }
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.chat_template = (
        "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}{% if add_generation_prompt %}w5{% endif %}"
    )
    fast.save_pretrained(folder)


def save_random_model(
    folder: str, config: dict, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> str:
    """`config` is a config.json dict with "model_type" (llama, qwen2, qwen3, qwen3_moe, mixtral, ...) and its
    sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    params = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "torch_dtype")}
    cfg = AutoConfig.for_model(config["model_type"], **params)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(folder)
    save_tokenizer(folder, cfg.vocab_size)
    return folder
