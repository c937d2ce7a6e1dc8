"""The engine's admission checks of a tokenized request: one function, run by the engine itself and, before
a request crosses to the engine core process, by the server (so that it answers 400 at once)."""

from nanoserve.engine_pod.errors import InvalidRequestError
from nanoserve.engine_pod.sampling_params import SamplingParams


def check_request(
    token_ids: list[int], params: SamplingParams, max_model_len: int, block_size: int, num_blocks: int, vocab_size: int
) -> None:
    """InvalidRequestError (naming the field) for a request this engine could never serve."""
    for name, ids in params.token_ids_to_check().items():
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})", name)
    if not token_ids:
        raise InvalidRequestError("prompt is empty", "prompt")
    if len(token_ids) >= max_model_len:
        raise InvalidRequestError(
            f"prompt has {len(token_ids)} tokens; this engine's max_model_len is "
            f"{max_model_len}, which must leave room for at least one generated token",
            "prompt",
        )
    need = -(-min(len(token_ids) + params.max_tokens, max_model_len) // block_size)  # blocks, rounded up
    if need > num_blocks:
        raise InvalidRequestError(
            f"request needs {need} KV-cache blocks but the cache has only {num_blocks}; lower max_tokens or the prompt",
            "max_tokens",
        )
