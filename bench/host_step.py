"""Host cost per step of the engine's Python side on the throughput workload, no model and no GPU:
schedule, prepare (step inputs), sampling inputs, advance, and resolving the sampled tokens, for the
1,033 steps of Nano-vLLM's workload (256 sequences, async scheduling's order, every token = 7).
On the GPU these run while the previous step computes; they bound the small-batch steps."""

import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from throughput import nano_vllm_workload  # noqa: E402

from common import QWEN3_0_6B  # noqa: E402
from nanoserve.engine_pod.block_manager import BlockManager  # noqa: E402
from nanoserve.engine_pod.config import Config  # noqa: E402
from nanoserve.engine_pod.sampler import sampling_inputs  # noqa: E402
from nanoserve.engine_pod.scheduler import Scheduler  # noqa: E402
from nanoserve.engine_pod.sequence import Sequence  # noqa: E402
from nanoserve.engine_pod.step_inputs import prepare  # noqa: E402


def main() -> None:
    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "config.json"), "w") as f:  # the scheduler needs the config, no weights
        json.dump(QWEN3_0_6B, f)
    config = Config(folder, max_model_len=4096, max_num_batched_tokens=16384, device="cpu")
    scheduler = Scheduler(config, BlockManager(71_656, 16, True))
    for prompt, params in zip(*nano_vllm_workload()):
        scheduler.add(Sequence(prompt, params))
    rng, phases, steps, in_flight = (
        random.Random(0),
        dict.fromkeys(["schedule", "prepare", "sampling_inputs", "advance", "resolve"], 0.0),
        0,
        None,
    )

    def timed(name, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        phases[name] += time.perf_counter() - t
        return out

    while not scheduler.is_finished() or in_flight:
        batch = timed("schedule", scheduler.schedule)
        launched = None
        if batch:
            _, sampling = timed("prepare", prepare, batch, 16)
            if sampling:
                timed("sampling_inputs", sampling_inputs, sampling, rng)
            timed("advance", scheduler.advance, batch, sampling)
            launched = sampling
        if in_flight:
            timed(
                "resolve",
                lambda f=in_flight: [
                    scheduler.resolve(s, s.num_tokens - s.num_pending, 7) for s in f if not s.is_finished
                ],
            )
        in_flight, steps = launched, steps + 1
    print(
        "RESULT "
        + json.dumps({"steps": steps, **{f"{k}_ms_per_step": round(1e3 * v / steps, 3) for k, v in phases.items()}})
    )


if __name__ == "__main__":
    main()
