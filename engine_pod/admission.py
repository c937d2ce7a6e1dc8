"""The engine's admission checks of a tokenized request: one function, run by the engine itself and, before
a request crosses to the engine core process, by the server (so that it answers 400 at once)."""

from nanoserve.engine_pod.errors import InvalidRequestError
from nanoserve.engine_pod.sampling_params import SamplingParams


def _is_token(t: object, vocab_size: int) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size


def check_prompt(token_ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """A prompt that is empty, too long to leave room for one generated token, or not token ids."""
    if not token_ids:
        raise InvalidRequestError("the prompt is empty", "prompt")
    if len(token_ids) >= max_model_len:
        raise InvalidRequestError(
            f"This model's maximum context length (max_model_len) is {max_model_len} tokens; the prompt has "
            f"{len(token_ids)} tokens, which leaves no room for a generated token",
            "prompt",
            "context_length_exceeded",
        )
    bad = next((t for t in token_ids if not _is_token(t, vocab_size)), None)
    if bad is not None:
        raise InvalidRequestError(f"prompt: token id {bad!r} is outside the vocabulary [0, {vocab_size})", "prompt")


def check_request(
    token_ids: list[int], params: SamplingParams, max_model_len: int, block_size: int, num_blocks: int, vocab_size: int
) -> None:
    """InvalidRequestError (naming the field) for a request this engine could never serve."""
    check_prompt(token_ids, vocab_size, max_model_len)
    for name, ids in params.token_ids_to_check().items():
        bad = next((t for t in ids if not _is_token(t, vocab_size)), None)
        if bad is not None:
            raise InvalidRequestError(f"{name}: token id {bad!r} is outside the vocabulary [0, {vocab_size})", name)
    need = -(-min(len(token_ids) + params.max_tokens, max_model_len) // block_size)  # blocks, rounded up
    if need > num_blocks:
        raise InvalidRequestError(
            f"request needs {need} KV-cache blocks but the cache has only {num_blocks}; lower max_tokens or the prompt",
            "max_tokens",
        )
