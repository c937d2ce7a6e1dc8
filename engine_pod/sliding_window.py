"""Which layers attend through a sliding window, and how wide, as transformers derives it from config.json.
Torch-free: Config reads it too."""

# Where config.json has no `layer_types`, transformers' own default pattern of sliding layers.
_DEFAULT_PATTERN = {"gemma3_text": 6, "gemma2": 2, "gpt_oss": 2}


def layer_sliding_windows(cfg: dict) -> list[int | None]:
    """One entry per layer: its window W (a query sees its last W keys) or None (full attention).

    `layer_types` ("sliding_attention" / "full_attention") where present (transformers 5 writes it);
    otherwise Qwen2/Qwen3's `use_sliding_window` with `max_window_layers`, Gemma's `sliding_window_pattern`
    (every n-th layer full), and a plain `sliding_window` on every layer (Mistral v0.1, Mixtral)."""
    layers = cfg["num_hidden_layers"]
    window = cfg.get("sliding_window")
    if "use_sliding_window" in cfg and not cfg["use_sliding_window"]:
        window = None  # Qwen2/Qwen3 carry a window they do not use
    if not window:
        return [None] * layers
    if types := cfg.get("layer_types"):
        return [window if t == "sliding_attention" else None for t in types]
    pattern = cfg.get("sliding_window_pattern") or _DEFAULT_PATTERN.get(cfg.get("model_type", ""))
    if pattern:
        return [window if (i + 1) % pattern else None for i in range(layers)]
    if cfg.get("model_type") in ("qwen2", "qwen3"):  # layers from max_window_layers on slide
        first = cfg.get("max_window_layers", 28)
        return [window if i >= first else None for i in range(layers)]
    return [window] * layers
