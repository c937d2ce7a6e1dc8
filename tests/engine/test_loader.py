"""The loader streams a checkpoint split into several safetensors shards (as published models are), with a
progress bar over them."""

import glob
import os

from parity import engine_greedy, random_prompts
from tiny_models import build_tiny_model


def test_a_sharded_checkpoint_loads_like_one_file_with_a_progress_bar(tmp_path, capfd):
    from transformers import AutoModelForCausalLM

    one = build_tiny_model(str(tmp_path / "one"), "qwen3", seed=2)
    sharded = str(tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(one).save_pretrained(sharded, max_shard_size="200KB")
    for f in glob.glob(os.path.join(one, "tokenizer*")) + glob.glob(os.path.join(one, "special_tokens*")):
        os.link(f, os.path.join(sharded, os.path.basename(f)))
    shards = len(glob.glob(os.path.join(sharded, "*.safetensors")))
    assert shards >= 3
    prompts = random_prompts(200, [5, 30], seed=1)
    capfd.readouterr()
    assert engine_greedy(sharded, prompts) == engine_greedy(one, prompts)
    err = capfd.readouterr().err
    assert "Loading safetensors checkpoint shards" in err and f"{shards}/{shards}" in err
