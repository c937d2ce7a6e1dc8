"""Offline batch generation, the Python API of docs/contracts.md: `LLM(model).generate(prompts, params)`."""

from tqdm.auto import tqdm

from nanoserve.common.chat import chat_prompt_ids
from nanoserve.engine_pod.llm_engine import LLMEngine
from nanoserve.engine_pod.sampling_params import SamplingParams, best_of
from nanoserve.engine_pod.sequence import Sequence


class LLM(LLMEngine):
    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[dict]:
        """Complete every prompt (a string or a token-id list is one prompt); results come back in input order
        as dicts with "text", "token_ids" (completion only), "finish_reason" and, when asked, "logprobs" (a
        token_logprobs.TokenLogprobs per token). With n > 1 (or best_of), "outputs" holds the n completions (best
        first under best_of) and the keys above are the first one's."""
        one = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        batch: list = [prompts] if one else list(prompts)
        params = sampling_params or SamplingParams(**self.config.sampling_defaults)  # the model's, as vLLM
        if not isinstance(params, list):
            params = [params] * len(batch)
        if len(params) != len(batch):
            raise ValueError(f"{len(batch)} prompts but {len(params)} sampling params")
        # Validate all before queueing any; a prompt's n children go in together (they share its blocks).
        groups = [
            [self.make_sequence(p, sp.child(j)) for j in range(sp.best_of or sp.n)] for p, sp in zip(batch, params)
        ]
        seqs = [seq for group in groups for seq in group]
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
        return [
            self._grouped([results.get(s.seq_id) or self._result(s) for s in group], sp)
            for group, sp in zip(groups, params)
        ]

    @staticmethod
    def _grouped(outputs: list[dict], params: SamplingParams) -> dict:
        if params.ranks_best_of:
            means = [sum(e.logprob for e in o["logprobs"]) / max(1, len(o["logprobs"])) for o in outputs]
            outputs = [outputs[i] for i in best_of(means, params.n)]
            if params.logprobs is None:  # asked for the ranking only
                outputs = [{k: v for k, v in o.items() if k != "logprobs"} for o in outputs]
        return outputs[0] | ({"outputs": outputs} if len(outputs) > 1 or params.n > 1 else {})

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[dict]:
        """Answer one conversation (a list of OpenAI messages) or several, through the model's chat template
        (with `tools` and `chat_template_kwargs`, e.g. {"enable_thinking": False}), as the server renders them;
        results as `generate`'s."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [chat_prompt_ids(self.tokenizer, c, tools, chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _result(self, seq: Sequence) -> dict:
        out = {"text": self.decode(seq), "token_ids": seq.completion_token_ids, "finish_reason": seq.finish_reason}
        if seq.params.logprobs is not None:
            out["logprobs"] = seq.logprobs
        if seq.params.prompt_logprobs is not None:
            out["prompt_logprobs"] = [None] + seq.prompt_logprobs  # (the first token has nothing before it)
        return out
