"""TP=2 on CPU (gloo, two processes: this one drives, a spawned worker follows through shared memory)
gives the same greedy tokens as TP=1, for an odd vocabulary (padded shards) and qkv biases; a failed step
or a worker dead at start-up ends cleanly (a worker killed mid-generation: tests/server/test_tp_faults.py)."""

import os
import signal
import subprocess
import sys

import prelaunch
import pytest
from poll import until

from nanoserve.engine_pod import LLM, SamplingParams

PROMPTS = [[3, 4, 5], list(range(10, 50)), [7] * 19]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.mark.parametrize("arch, async_scheduling", [("qwen2", False), ("qwen3", True)])
def test_tp2_equals_tp1(tiny_models, arch, async_scheduling):
    one = LLM(tiny_models[arch], num_kvcache_blocks=64)
    expected = [o["token_ids"] for o in one.generate(PROMPTS, GREEDY)]
    one.exit()
    # Async: the worker gets the previous step's sampled tokens from rank 0 (a broadcast) for its inputs.
    two = LLM(
        tiny_models[arch],
        tensor_parallel_size=2,
        num_kvcache_blocks=64,
        max_num_batched_tokens=32,
        async_scheduling=async_scheduling,
    )
    try:
        assert [o["token_ids"] for o in two.generate(PROMPTS, GREEDY)] == expected
        assert two.workers.procs[0].is_alive()
    finally:
        two.exit()
    assert not two.workers.procs[0].is_alive()


SCRIPT = """llm = LLM({model!r}, tensor_parallel_size=2, num_kvcache_blocks=32)
tokens = llm.generate([{prompt!r}], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]["token_ids"]
print(llm.workers.procs[0].pid, tokens, flush=True)
sys.stdin.read()  # until the test closes it, or kills us
llm.exit()
"""


def write_script(folder, model: str, guarded: bool) -> str:
    """A user's script file that runs a TP=2 LLM, with or without the `if __name__ == "__main__":` guard."""
    body = SCRIPT.format(model=model, prompt=PROMPTS[1])
    if guarded:
        body = 'if __name__ == "__main__":\n' + "".join("    " + line for line in body.splitlines(True))
    (folder / "script.py").write_text("import sys\nfrom nanoserve.engine_pod import LLM, SamplingParams\n" + body)
    return str(folder / "script.py")


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def run_script(get, guarded: bool, **popen) -> subprocess.Popen:
    """The user's script (write_script) on the tiny qwen3, started."""
    script = write_script(get("tmp_path_factory").mktemp("tp-script"), get("tiny_models")["qwen3"], guarded)
    return subprocess.Popen([sys.executable, script], text=True, env={**os.environ, "PYTHONSAFEPATH": "1"}, **popen)


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


# Both scripts are started ahead of their tests (tests/prelaunch.py): each is a torch import and a TP=2 start.
prelaunch.plan("tp other engine", prelaunch.uses("other_engine"), stop=_kill, weight=2)(
    lambda get: run_script(get, True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
)
prelaunch.plan("tp unguarded script", prelaunch.uses("unguarded_script"), stop=_kill, weight=2)(
    lambda get: run_script(get, False, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
)


@pytest.fixture
def other_engine(request):
    """Another process's TP=2 engine, from a guarded script file, as users write them (the workers import it
    again): it prints its worker's pid and tokens, then waits until stdin closes."""
    other = prelaunch.take("tp other engine", request.getfixturevalue)
    yield other
    _kill(other)


@pytest.fixture
def unguarded_script(request):
    """The script without the main guard, run to its end: (exit code, stdout, stderr)."""
    run = prelaunch.take("tp unguarded script", request.getfixturevalue)
    try:
        stdout, stderr = run.communicate(timeout=30)
    finally:
        _kill(run)
    return run.returncode, stdout, stderr


def test_two_tp_engines_on_one_host_and_one_killed(tiny_models, other_engine):
    # Another process runs its own TP=2 engine while ours runs: shared-memory names and ports must differ.
    other = other_engine
    ours = LLM(tiny_models["qwen3"], tensor_parallel_size=2, num_kvcache_blocks=32)
    try:
        mine = ours.generate([PROMPTS[1]], GREEDY)[0]["token_ids"]
        worker, theirs = other.stdout.readline().split(" ", 1)
        assert theirs.strip() == str(mine)
        # Killed, the other engine leaves no worker behind (waiting for a command forever, it would hold its
        # GPU's memory and a restarted engine could not start); ours runs on.
        other.kill()
        until(lambda: not running(int(worker)), "the killed engine's worker to exit (it outlived its rank 0)")
        assert ours.generate([PROMPTS[1]], GREEDY)[0]["token_ids"] == mine
    finally:
        ours.exit()
        other.kill()
        other.wait()


def test_a_script_without_the_main_guard_fails_at_once_naming_it(unguarded_script):
    # The spawned worker imports the script again and dies in multiprocessing's bootstrapping check: rank 0
    # must say so, not wait for it in the rendezvous (the process group's timeout: 30 minutes).
    returncode, stdout, stderr = unguarded_script
    assert returncode != 0 and not stdout
    assert "WorkerDied: tensor-parallel worker 1" in stderr and "during start-up" in stderr, stderr
    assert 'put it under `if __name__ == "__main__":`' in stderr, stderr


def test_a_failed_step_tears_down_and_a_worker_killed_while_idle_fails_the_next_step(tiny_models):
    from nanoserve.engine_pod.tp_workers import WorkerDied

    # Rank 0 fails inside the forward, after the worker entered it: the worker waits in a collective
    # that never comes, so exit must not try a graceful (collective) shutdown.
    llm = LLM(tiny_models["qwen3"], tensor_parallel_size=2, num_kvcache_blocks=32)
    llm.model_runner.model.compute_logits = lambda hidden: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        llm.generate([PROMPTS[0]], GREEDY)
    llm.exit()
    assert not llm.workers.procs[0].is_alive()
    again = LLM(tiny_models["qwen3"], tensor_parallel_size=2, num_kvcache_blocks=32)  # the group was released
    worker = again.workers.procs[0]
    try:
        assert len(again.generate([PROMPTS[0]], GREEDY)[0]["token_ids"]) == 10
        # Killed while it waits for a command: posting the next one must not hang (multiprocessing's
        # Event.set() waits for the waiters it wakes), the step raises WorkerDied naming the worker.
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=30)
        with pytest.raises(WorkerDied, match=rf"worker 1 \(pid {worker.pid}\) died with signal SIGKILL"):
            again.check()
        with pytest.raises(WorkerDied, match="SIGKILL"):
            again.generate([PROMPTS[0]], GREEDY)
    finally:
        again.exit()
