"""Offline batch generation, the Python API of DESIGN.md: `LLM(model).generate(prompts, params)`."""
from tqdm.auto import tqdm

from nanoserve.common.chat import chat_prompt_ids
from nanoserve.engine_pod.llm_engine import LLMEngine
from nanoserve.engine_pod.sampling_params import SamplingParams
from nanoserve.engine_pod.sequence import Sequence


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
        results: dict[int, dict] = {}
        bar = tqdm(total=len(seqs), desc="Generating", disable=not use_tqdm)
        try:
            while self.has_unfinished():
                # Results are built as sequences finish: the host does it while the GPU runs the next step.
                for seq in [s for s, _ in self.step() if s.is_finished]:
                    results[seq.seq_id] = self._result(seq)
                    bar.update(1)
        finally:
            bar.close()
            for seq in seqs:  # an interrupted generate leaves nothing queued and no block taken
                self.abort(seq.seq_id)
        return [results.get(s.seq_id) or self._result(s) for s in seqs]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None) -> list[dict]:
        """Answer one conversation (a list of OpenAI messages) or several, through the model's chat template
        (with `tools` and `chat_template_kwargs`, e.g. {"enable_thinking": False}), as the server renders them;
        results as `generate`'s."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [chat_prompt_ids(self.tokenizer, c, tools, chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _result(self, seq: Sequence) -> dict:
        return {"text": self.decode(seq), "token_ids": seq.completion_token_ids, "finish_reason": seq.finish_reason}
