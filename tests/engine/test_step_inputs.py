"""A step's flattened inputs: rows go longest context first (the decode attention kernel's order), and
every per-row array, the block tables and the sampling rows follow that order."""

from nanoserve.engine_pod.sampling_params import SamplingParams
from nanoserve.engine_pod.sequence import PLACEHOLDER, Sequence
from nanoserve.engine_pod.step_inputs import prepare


def running(tokens: list[int], computed: int, first_block: int, block_size: int = 4) -> Sequence:
    seq = Sequence(tokens, SamplingParams())
    seq.num_computed_tokens = computed
    seq.block_table = list(range(first_block, first_block + -(-len(tokens) // block_size)))
    return seq


def test_rows_go_longest_context_first_and_everything_follows():
    short = running([1, 2, 3], 2, first_block=10)  # decode at context 3
    long = running(list(range(100, 111)), 10, first_block=20)  # decode at context 11
    prefill = running([7, 8, 9, 5, 6], 0, first_block=30)  # 5-token prefill, context 5
    chunk = running(list(range(50, 62)), 0, first_block=40)  # first 4 tokens of 12: no token yet
    long.token_ids[-1] = PLACEHOLDER
    long.pending_row = 3
    inputs, sampling = prepare([(short, 1), (chunk, 4), (long, 1), (prefill, 5)], block_size=4)
    assert inputs.context_lens.tolist() == [11, 5, 4, 3]
    assert sampling == [long, prefill, short]  # the chunk's prompt is not done: it samples nothing
    assert inputs.cu_seqlens_q.tolist() == [0, 1, 6, 10, 11]
    assert inputs.input_ids.tolist() == [PLACEHOLDER, 7, 8, 9, 5, 6, 50, 51, 52, 53, 3]
    assert inputs.positions.tolist() == [10, 0, 1, 2, 3, 4, 0, 1, 2, 3, 2]
    assert inputs.logits_indices.tolist() == [0, 5, 10]
    assert inputs.prev_rows.tolist() == [3] + [-1] * 10
    assert inputs.block_tables[:, 0].tolist() == [20, 30, 40, 10]
    assert inputs.slot_mapping.tolist()[:2] == [22 * 4 + 2, 30 * 4]
    assert inputs.max_seqlen_q == 5 and inputs.max_seqlen_k == 11
