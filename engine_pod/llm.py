"""Offline batch generation, the Python API of DESIGN.md: `LLM(model).generate(prompts, params)`."""
from tqdm.auto import tqdm

from nanoserve.engine_pod.llm_engine import LLMEngine
from nanoserve.engine_pod.sampling_params import SamplingParams


class LLM(LLMEngine):

    def generate(self, prompts: list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[dict]:
        """Complete every prompt; results come back in input order as dicts with "text", "token_ids"
        (completion only) and "finish_reason"."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        params = sampling_params or SamplingParams()
        if not isinstance(params, list):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        seqs = [self.make_sequence(p, sp) for p, sp in zip(prompts, params)]  # validate all before queueing any
        for seq in seqs:
            self.add_sequence(seq)
        bar = tqdm(total=len(seqs), desc="Generating", disable=not use_tqdm)
        try:
            while self.has_unfinished():
                bar.update(sum(s.is_finished for s, _ in self.step()))
        finally:
            bar.close()
            for seq in seqs:  # an interrupted generate leaves nothing queued and no block taken
                self.abort(seq.seq_id)
        return [{"text": self.decode(s), "token_ids": s.completion_token_ids, "finish_reason": s.finish_reason}
                for s in seqs]
