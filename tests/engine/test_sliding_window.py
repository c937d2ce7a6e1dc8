"""Each layer's sliding window as transformers derives it, from configs with and without `layer_types`
(transformers 5 writes it; published 4.x configs do not)."""

import pytest
from transformers import AutoConfig

from nanoserve.engine_pod.sliding_window import layer_sliding_windows

CONFIGS = {
    "mistral": dict(sliding_window=16),
    "mistral_none": dict(sliding_window=None),
    "qwen2": dict(use_sliding_window=True, sliding_window=16, max_window_layers=2),
    "qwen2_off": dict(use_sliding_window=False, sliding_window=16),
    "gemma3_text": dict(sliding_window=16),
    "gemma3_text_pattern": dict(sliding_window=16, sliding_window_pattern=3),
    "gpt_oss": dict(sliding_window=16),
}


def hf_windows(cfg) -> list[int | None]:
    # transformers' modeling: a layer slides where its layer type says so (Mistral: every layer).
    types = getattr(cfg, "layer_types", None) or ["sliding_attention"] * cfg.num_hidden_layers
    return [cfg.sliding_window if t == "sliding_attention" else None for t in types]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("with_layer_types", [True, False])
def test_windows_equal_transformers(name, with_layer_types):
    model_type = name.removesuffix("_none").removesuffix("_off").removesuffix("_pattern")
    hf = AutoConfig.for_model(model_type, num_hidden_layers=6, **CONFIGS[name])
    d = hf.to_dict()
    if not with_layer_types:
        d.pop("layer_types", None)
        d.update({k: v for k, v in CONFIGS[name].items() if k == "sliding_window_pattern"})
    expected = hf_windows(hf)
    assert layer_sliding_windows(d) == expected
