"""A model's rotary-embedding parameters as transformers reads them from config.json (its 4.x `rope_scaling`
and `rope_theta`, or 5.x `rope_parameters`), and the longest sequence they allow. Torch-free: Config uses it.
transformers' dynamic NTK and LongRoPE change the frequencies per forward with the sequence's length; a paged
KV cache holds keys rotated once, so layers/rotary.py fixes them for the served length (max_model_len), as
vLLM does."""

from nanoserve.engine_pod.errors import ModelLoadError

# What layers/rotary.py computes: transformers' ROPE_INIT_FUNCTIONS, and the default.
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope", "proportional")


def rope_parameters(hf_config: dict, layer_type: str = "full_attention") -> tuple[float, dict]:
    """(theta, scaling): `scaling` has its "rope_type", and for the types that extend a pretrained length
    its "original_max_position_embeddings" (a top-level field wins, as transformers has it, else the
    model's max_position_embeddings; dynamic NTK has none: max_position_embeddings is its pretrained length)
    and "max_position_embeddings".
    Gemma 3 has a rope per layer type ("sliding_attention" / "full_attention"): transformers 5 writes a
    `rope_parameters` dict of both; 4.x configs give the sliding layers `rope_local_base_freq`, unscaled."""
    params = hf_config.get("rope_parameters") or {}
    top_theta, top_scaling = hf_config.get("rope_theta"), hf_config.get("rope_scaling")
    if "full_attention" in params or "sliding_attention" in params:
        params, top_theta = params.get(layer_type) or {}, None
    elif layer_type == "sliding_attention" and "rope_local_base_freq" in hf_config:
        params, top_theta, top_scaling = {}, hf_config["rope_local_base_freq"], None
    theta = top_theta or params.get("rope_theta") or 10000.0
    scaling = dict(top_scaling or params or {})
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    kind = "longrope" if kind == "su" else kind  # Phi-3's first name for it (vLLM and transformers map it)
    if kind not in ROPE_TYPES:
        raise ModelLoadError(f"rope type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    partial = scaling.get("partial_rotary_factor") or hf_config.get("partial_rotary_factor") or 1.0
    if kind == "proportional":  # its unrotated dimensions keep the table head_dim wide (layers/rotary.py)
        scaling["partial_rotary_factor"] = partial
    elif partial != 1.0:
        raise ModelLoadError(
            "a partial rotary embedding (partial_rotary_factor < 1) is supported with rope type 'proportional' only"
        )
    scaling["rope_type"] = kind
    if kind in ("llama3", "yarn", "longrope"):
        top = hf_config.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = (
            top or scaling.get("original_max_position_embeddings") or hf_config.get("max_position_embeddings")
        )
    if kind in ("dynamic", "llama3", "yarn", "longrope"):
        scaling["max_position_embeddings"] = hf_config.get("max_position_embeddings")
    return float(theta), scaling


def model_max_len(hf_config: dict) -> int | None:
    """The longest sequence the model was made for: max_position_embeddings, or under YaRN the pretrained
    length times its factor, under dynamic NTK max_position_embeddings times its factor (vLLM's rules;
    LongRoPE's max_position_embeddings is already the extended length). A sliding window does not bound
    it: attention applies it."""
    length = hf_config.get("max_position_embeddings")
    _, scaling = rope_parameters(hf_config)
    if scaling["rope_type"] == "yarn" and scaling.get("factor"):
        length = int(scaling["original_max_position_embeddings"] * scaling["factor"])
    if scaling["rope_type"] == "dynamic" and length and scaling.get("factor"):
        length = int(length * scaling["factor"])
    return length
