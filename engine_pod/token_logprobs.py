"""A token's logprobs as the engine hands them to responses (torch-free: the server process reads them)."""

from typing import NamedTuple

import numpy as np


class TokenLogprobs(NamedTuple):
    """A sampled token's logprob (from the raw logits, as vLLM's default logprobs mode), its rank among the
    vocabulary (1 = the most likely) and the top tokens as (token id, logprob), most likely first."""

    logprob: float
    rank: int
    top: list[tuple[int, float]]


def unpack_logprobs(row: np.ndarray, k: int) -> TokenLogprobs:
    """One row of `token_logprobs`' result, with the request's own k."""
    width = (len(row) - 2) // 2
    ids, values = row[2 : 2 + width], row[2 + width :]
    return TokenLogprobs(float(row[0]), int(row[1]), [(int(ids[i]), float(values[i])) for i in range(k)])
