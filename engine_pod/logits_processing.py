"""The logits processing before sampling, in vLLM's order: allowed token ids, bad words, min_tokens and logit
bias; then the presence, frequency and repetition penalties. (Temperature, min_p and top-k/top-p follow in
sampler.py.)

The host (`processing_inputs`) turns the rows that ask for any of it into a few flat arrays that travel in
the step's one upload; the device (`apply_processing`) applies them to the whole batch with a handful of
scatters, never a loop over rows. With async scheduling a row's newest token may still be on the GPU (a
placeholder on the host): its penalty, and a bad word whose prefix ends in it, read it on the device from
the previous step's sampled tokens.
"""

import numpy as np
import torch

from nanoserve.engine_pod.sequence import PLACEHOLDER, Sequence

_BAN = float("-inf")


def _i64(values) -> np.ndarray:
    return np.asarray(values, np.int64)


def _f64(values) -> np.ndarray:
    return np.asarray(values, np.float64)


def bad_words_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Each bad word's token sequences, as vLLM makes them: the word as written and after a space (a word
    inside a sentence is usually tokenized with its leading space)."""
    out = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in out:
                out.append(ids)
    return out


def processing_inputs(seqs: list[Sequence], eos_ids: list[int]) -> dict[str, np.ndarray] | None:
    """The arrays for `apply_processing` of one step's sampling rows, or None when no row needs any."""
    add_rows, add_tokens, add_values, add_if_row, add_if_token = [], [], [], [], []
    allow_row_ids, allow_rows, allow_tokens = [], [], []
    pen = []

    def add(row: int, token: int, value: float, if_row: int = -1, if_token: int = 0) -> None:
        """Add `value` to the row's logit of `token` (if_row >= 0: only if the previous step's token there
        is `if_token`)."""
        add_rows.append(row)
        add_tokens.append(token)
        add_values.append(value)
        add_if_row.append(if_row)
        add_if_token.append(if_token)

    for row, seq in enumerate(seqs):
        p = seq.params
        for token, bias in (p.logit_bias or {}).items():
            add(row, token, bias)
        if p.min_tokens and seq.num_tokens - seq.num_prompt_tokens < p.min_tokens:
            for token in set(p.stop_token_ids) | set(eos_ids):  # (vLLM masks EOS even under ignore_eos)
                add(row, token, _BAN)
        for token, if_row, if_token in _bad_word_bans(seq):
            add(row, token, _BAN, if_row, if_token)
        if p.allowed_token_ids is not None:
            allow_row_ids.append(row)
            allow_rows += [row] * len(p.allowed_token_ids)
            allow_tokens += p.allowed_token_ids
        if p.penalized:
            pen.append((row, seq))
    out = {}
    if add_rows:
        out.update(add_rows=_i64(add_rows), add_tokens=_i64(add_tokens), add_values=_f64(add_values))
        if any(r >= 0 for r in add_if_row):  # decided here: the device never has to say (a sync)
            out.update(add_if_row=_i64(add_if_row), add_if_token=_i64(add_if_token))
    if allow_rows:
        out.update(allow_row_ids=_i64(allow_row_ids), allow_rows=_i64(allow_rows), allow_tokens=_i64(allow_tokens))
    if pen:
        out.update(_penalty_inputs(pen))
    return out or None


def _bad_word_bans(seq: Sequence):
    """(token, row of the previous step's tokens that must equal `if_token` for the ban, or -1) per banned token:
    a bad word's last token is banned once the output ends in the rest of it (vLLM's rule)."""
    output = seq.token_ids[seq.num_prompt_tokens :]
    for word in seq.bad_words_ids:
        *prefix, last = word
        if not prefix:
            yield last, -1, 0
            continue
        if len(output) < len(prefix):
            continue
        tail = output[-len(prefix) :]
        if tail[-1] == PLACEHOLDER:  # the newest token is still on the device: compare it there
            if tail[:-1] == prefix[:-1]:
                yield last, seq.pending_row, prefix[-1]
        elif tail == prefix:
            yield last, -1, 0


def _penalty_inputs(pen: list[tuple[int, Sequence]]) -> dict[str, np.ndarray]:
    out_p, out_tok, out_cnt, prompt_p, prompt_tok, pend_p, pend_row = [], [], [], [], [], [], []
    for i, (_, seq) in enumerate(pen):
        output = np.asarray(seq.token_ids[seq.num_prompt_tokens :], np.int64)
        if len(output) and output[-1] == PLACEHOLDER:
            output = output[:-1]
            pend_p.append(i)
            pend_row.append(seq.pending_row)
        tokens, counts = np.unique(output, return_counts=True)
        out_p.append(np.full(len(tokens), i, np.int64))
        out_tok.append(tokens)
        out_cnt.append(counts)
        if seq.params.repetition_penalty != 1:
            unique_prompt = seq.prompt_unique()
            prompt_p.append(np.full(len(unique_prompt), i, np.int64))
            prompt_tok.append(unique_prompt)
    params = [s.params for _, s in pen]
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return {
        "pen_rows": _i64([row for row, _ in pen]),
        "pen_presence": _f64([p.presence_penalty for p in params]),
        "pen_frequency": _f64([p.frequency_penalty for p in params]),
        "pen_repetition": _f64([p.repetition_penalty for p in params]),
        "pen_out_p": cat(out_p),
        "pen_out_tok": cat(out_tok),
        "pen_out_cnt": cat(out_cnt).astype(np.int64),
        "pen_prompt_p": cat(prompt_p),
        "pen_prompt_tok": cat(prompt_tok),
        "pen_pend_p": _i64(pend_p),
        "pen_pend_row": _i64(pend_row),
    }


def apply_processing(logits: torch.Tensor, dev: dict[str, torch.Tensor], prev: torch.Tensor | None) -> torch.Tensor:
    """float32 logits [rows, vocab] with the step's processing applied (a new tensor). `prev`: the previous
    step's sampled tokens on the device (read by rows whose newest token the host has not seen)."""
    logits = logits.float().clone()
    if "allow_rows" in dev:
        blocked = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        blocked[dev["allow_row_ids"]] = True
        blocked[dev["allow_rows"], dev["allow_tokens"]] = False
        logits.masked_fill_(blocked, _BAN)
    if "add_rows" in dev:
        values = dev["add_values"].float()
        if "add_if_row" in dev and prev is not None:  # bad words whose prefix ends in a token the host lacks
            if_row = dev["add_if_row"]
            met = (if_row < 0) | (prev[if_row.clamp(min=0)] == dev["add_if_token"])
            values = torch.where(met, values, 0.0)
        logits.index_put_((dev["add_rows"], dev["add_tokens"]), values, accumulate=True)
    if "pen_rows" in dev:
        rows = dev["pen_rows"]
        logits[rows] = _penalized(logits[rows], dev, prev)
    return logits


def _penalized(logits: torch.Tensor, dev: dict[str, torch.Tensor], prev: torch.Tensor | None) -> torch.Tensor:
    counts = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    counts.index_put_((dev["pen_out_p"], dev["pen_out_tok"]), dev["pen_out_cnt"].float(), accumulate=True)
    if len(dev["pen_pend_p"]) and prev is not None:
        pending = prev[dev["pen_pend_row"]]
        counts.index_put_((dev["pen_pend_p"], pending), torch.ones_like(pending, dtype=torch.float32), accumulate=True)
    in_output = counts > 0
    repetition = dev["pen_repetition"].float().unsqueeze(1)
    seen = in_output.clone()
    seen[dev["pen_prompt_p"], dev["pen_prompt_tok"]] = True
    logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    logits -= dev["pen_frequency"].float().unsqueeze(1) * counts
    logits -= dev["pen_presence"].float().unsqueeze(1) * in_output.float()
    return logits
